"""Small local datasets in the schemas of real lm-eval tasks, written as an evaluation mirror.

Nothing is downloaded. MMLU uses the real MMLU dev questions that ship inside the lm-eval
package (the questions of its chain-of-thought few-shot prompts, `mmlu/flan_cot_fewshot`),
in the `cais/mmlu` schema; gsm8k and arithmetic items are generated; the standard tasks get a
handful of hand-written items each. The files follow `neoray.evaluation.mirror`'s layout, so
the tasks' own lm-eval configs run on them unchanged. They test the pipeline, not a model:
the five-shot MMLU context of a subject may contain its own test questions.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

from neoray.evaluation.mirror import split_path

MMLU_PROMPTS = ("lm_eval.tasks.mmlu.flan_cot_fewshot", "_cot_prompts.json")
_QUESTION = re.compile(
    r"Q: (?P<q>.*?)\n(?P<choices>\(A\).*?)\nA: .*?The answer is \((?P<a>[A-E])\)\.", re.S
)
_CHOICE = re.compile(r"\(([A-E])\) (.*?)(?=\s\([A-E]\) |$)", re.S)
LETTERS = "ABCD"


def mmlu_dev_questions() -> dict[str, list[dict]]:
    """Subject -> the four-choice dev questions shipped with lm-eval, as `cais/mmlu` rows."""
    package, name = MMLU_PROMPTS
    prompts = json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"))
    subjects = {}
    for subject, prompt in sorted(prompts.items()):
        rows = []
        for match in _QUESTION.finditer(prompt):
            choices = _CHOICE.findall(match["choices"])
            if [letter for letter, _ in choices] != list(LETTERS) or match["a"] not in LETTERS:
                continue  # a few prompts carry five-choice variants; MMLU has four
            rows.append(
                {
                    "question": match["q"].strip(),
                    "subject": subject,
                    "choices": [text.strip() for _, text in choices],
                    "answer": LETTERS.index(match["a"]),
                }
            )
        subjects[subject] = rows
    return subjects


def write_mmlu(data_dir: Path, subjects: list[str] | None = None) -> list[str]:
    """`mmlu_<subject>` test and dev splits; dev is topped up to five questions with the next
    subjects' questions (a few subjects ship fewer than five). Returns the task names."""
    questions = mmlu_dev_questions()
    names = sorted(questions)
    written = []
    for position, subject in enumerate(names):
        if subjects is not None and subject not in subjects:
            continue
        dev = list(questions[subject])
        for other in names[position + 1 :] + names[:position]:
            if len(dev) >= 5:
                break
            dev += questions[other][: 5 - len(dev)]
        task = f"mmlu_{subject}"
        _write_rows(split_path(data_dir, task, "test"), questions[subject])
        _write_rows(split_path(data_dir, task, "dev"), dev)
        written.append(task)
    return written


def write_gsm8k(data_dir: Path, count: int = 12, seed: int = 0) -> None:
    """Two-step word problems in the `openai/gsm8k` schema (answer ends in `#### N`)."""
    rng = random.Random(seed)

    def problem() -> dict:
        apples, bought, eaten = rng.randint(2, 40), rng.randint(2, 40), rng.randint(1, 9)
        total = apples + bought
        return {
            "question": f"Sam has {apples} apples and buys {bought} more. He eats {eaten}. "
            "How many apples does he have now?",
            "answer": f"Sam has {apples} + {bought} = <<{apples}+{bought}={total}>>{total} apples. "
            f"After eating, {total} - {eaten} = <<{total}-{eaten}={total - eaten}>>{total - eaten}."
            f"\n#### {total - eaten}",
        }

    _write_rows(split_path(data_dir, "gsm8k", "train"), [problem() for _ in range(count)])
    _write_rows(split_path(data_dir, "gsm8k", "test"), [problem() for _ in range(count)])


ARITHMETIC = {
    "arithmetic_2da": ("plus", lambda a, b: a + b),
    "arithmetic_2ds": ("minus", lambda a, b: a - b),
}


def write_arithmetic(data_dir: Path, count: int = 300, seed: int = 0) -> None:
    """Two-digit addition and subtraction in the `EleutherAI/arithmetic` jsonl schema."""
    rng = random.Random(seed)
    for task, (word, op) in ARITHMETIC.items():
        rows = []
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            rows.append(
                {
                    "context": f"Question: What is {a} {word} {b}?\nAnswer:",
                    "completion": f" {op(a, b)}",
                }
            )
        _write_rows(split_path(data_dir, task, "validation"), rows)


_FACTS = [
    ("water", "boils at 100 degrees Celsius at sea level", "freezes at 50 degrees"),
    ("the sun", "is a star at the centre of the solar system", "orbits the moon"),
    ("a spider", "has eight legs", "has six wings"),
    ("ice", "is frozen water", "is a kind of metal"),
    ("plants", "make food by photosynthesis", "make food by digestion of rocks"),
    ("the heart", "pumps blood through the body", "stores memories"),
    ("sound", "travels as a wave through air", "travels faster than light"),
    ("copper", "conducts electricity well", "is a gas at room temperature"),
]


def write_standard(data_dir: Path) -> list[str]:
    """A few items each for lambada_openai, piqa, arc_easy and sciq. Returns the task names."""
    lambada = [{"text": f"Everyone knows that {thing} {fact}"} for thing, fact, _ in _FACTS]
    _write_rows(split_path(data_dir, "lambada_openai", "test"), lambada)
    piqa = [
        {
            "goal": f"Describe {thing}.",
            "sol1": f"It {true}." if i % 2 == 0 else f"It {false}.",
            "sol2": f"It {false}." if i % 2 == 0 else f"It {true}.",
            "label": i % 2,
        }
        for i, (thing, true, false) in enumerate(_FACTS)
    ]
    _write_rows(split_path(data_dir, "piqa", "train"), piqa)
    _write_rows(split_path(data_dir, "piqa", "validation"), piqa)
    arc = []
    for i, (thing, true, false) in enumerate(_FACTS):
        wrong = [f for _, _, f in _FACTS if f != false][:2]
        texts = [false, *wrong]
        texts.insert(i % 4, true)
        arc.append(
            {
                "id": f"neoray-{i}",
                "question": f"Which statement about {thing} is true?",
                "choices": {"text": texts, "label": list("ABCD")},
                "answerKey": "ABCD"[i % 4],
            }
        )
    for split in ("train", "validation", "test"):
        _write_rows(split_path(data_dir, "arc_easy", split), arc)
    sciq = [
        {
            "question": f"What is true of {thing}?",
            "distractor1": false,
            "distractor2": _FACTS[(i + 1) % len(_FACTS)][2],
            "distractor3": _FACTS[(i + 2) % len(_FACTS)][2],
            "correct_answer": true,
            "support": f"Scientists study {thing} closely.",
        }
        for i, (thing, true, false) in enumerate(_FACTS)
    ]
    for split in ("train", "validation", "test"):
        _write_rows(split_path(data_dir, "sciq", split), sciq)
    return ["lambada_openai", "piqa", "arc_easy", "sciq"]


def write_all(data_dir: str | Path) -> Path:
    """Every local dataset above under `data_dir` (an evaluation mirror)."""
    data_dir = Path(data_dir)
    write_mmlu(data_dir)
    write_gsm8k(data_dir)
    write_arithmetic(data_dir)
    write_standard(data_dir)
    return data_dir


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def texts(data_dir: str | Path) -> list[str]:
    """Every string field of every row in the mirror at `data_dir` (a tokenizer corpus)."""

    def strings(value) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        return [s for item in value for s in strings(item)] if isinstance(value, list) else []

    found = []
    for path in sorted(Path(data_dir).rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            found += strings(json.loads(line))
    return found


def commit_stand_in_checkpoint(
    storage, run_name: str, step: int, created: float, final_step: int, files: int = 0
) -> None:
    """A committed checkpoint as the scheduled evaluation sees it, without weights: `files`
    one-byte layer files, then the manifest (written last, as training commits), saying it was
    committed at unix time `created` by a run that ends at `final_step`."""
    from datetime import datetime, timezone

    from neoray.checkpoint.manifest import FileEntry, Manifest, checkpoint_key, manifest_key

    entries = []
    for index in range(files):
        name = f"layer_{index:02d}-model_00-model_states.pt"
        storage.put_bytes(f"{checkpoint_key(run_name, step)}/{name}", b"x")
        entries.append(FileEntry(name, 1, "0" * 64))
    manifest = Manifest(
        run_name=run_name,
        step=step,
        tokens_seen=0,
        topology={"tp": 1, "pp": 1, "dp": 1},
        model={},
        config={"train.steps": final_step},
        code_version="stand-in",
        created=datetime.fromtimestamp(created, timezone.utc).isoformat(),
        files=entries,
    )
    storage.put_bytes(manifest_key(run_name, step), manifest.to_json().encode())


def write_tokenizer(out_path: str | Path, data_dir: str | Path, vocab_size: int = 512):
    """A NeoX-style tokenizer trained on the mirror's text, saved as `out_path` (tokenizer.json)."""
    from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    corpus = out_path.parent / f".{out_path.name}.corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(data_dir)))
    try:
        return train_tokenizer(
            TokenizerTrainConfig(input=[str(corpus)], output=str(out_path), vocab_size=vocab_size),
            show_progress=False,
        )
    finally:
        corpus.unlink()


def write_random_model(
    out_dir: str | Path,
    data_dir: str | Path,
    vocab_size: int = 512,
    num_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
    output_scale: float = 1.0,
) -> Path:
    """A randomly initialised GPT-NeoX in Hugging Face format, with a NeoX-style tokenizer
    trained on the mirror's text: a model to run evaluation pipelines on, in seconds.

    `output_scale` multiplies the output layer: a random model's next-token distributions are
    nearly flat, so its multiple-choice log-likelihoods nearly tie and a flipped argmax can hide
    or fake a difference; scaled up, they are far apart.
    """
    import torch

    from neoray.model import GPTNeoX, NeoXConfig
    from neoray.model.hf import save_hf

    out_dir = Path(out_dir)
    tokenizer_json = out_dir.parent / f".{out_dir.name}.tokenizer.json"
    tokenizer = write_tokenizer(tokenizer_json, data_dir, vocab_size)
    config = NeoXConfig(
        vocab_size=tokenizer.vocab_size,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=4,
        max_seq_len=2048,
    )
    with torch.random.fork_rng():  # seeded weights; the caller's random state untouched
        torch.manual_seed(seed)
        model = GPTNeoX(config).eval()
    with torch.no_grad():
        model.embed_out.weight.mul_(output_scale)
    path = save_hf(model, out_dir, tokenizer=tokenizer_json)
    tokenizer_json.unlink()
    return path
