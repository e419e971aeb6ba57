"""Tokenizing corpora into one Megatron-format indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

Input files are cut into shards (large `.jsonl` files into byte ranges). Each shard is read,
tokenized and turned into token arrays by `tokenize_shard`; the driver writes the results in
shard order, so the output is the same whichever executor ran the shards:

- `local`: shards one after another in this process; `encode_batch` uses every core, and a
  reader thread parses the next batch while the current one is encoded.
- `ray`: shards as Ray tasks spread over the cluster's nodes (`RAY_ADDRESS`, or a local Ray);
  the tokenizer travels through the object store, so workers need no shared filesystem for
  it, and so do the job's S3 settings and credentials (`neoray.cluster.job_env`), so workers
  read `s3://` inputs on nodes that have none of their own.

Every document gets `<|endoftext|>` appended. Bad records are skipped and listed with file and
line in `<prefix>.skipped.jsonl`; totals go to `<prefix>.report.json`. Output is written under
`.partial` names and published only once complete and verified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import chain
from typing import TextIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from neoray.config import ConfigError
from neoray.corpus import (
    Document,
    LineCounter,
    Shard,
    Skipped,
    expand_inputs,
    plan_shards,
    read_records,
)
from neoray.data.indexed import PARTIAL, IndexedDatasetWriter, publish, token_dtype
from neoray.data.remote import is_remote, upload_token_files
from neoray.tokenizer.load import END_OF_TEXT, TextTokenizer, load_tokenizer

EXECUTORS = ("local", "ray")


@dataclass
class PreprocessConfig:
    input: list[str]
    tokenizer: str
    output_prefix: str
    text_field: str = "text"
    executor: str = "local"
    shard_mb: float = 64  # byte-range size for splitting large .jsonl files over workers
    batch_size: int = 512  # documents per encode_batch call
    cpus_per_task: int = 1  # ray: cores each shard task uses for encode_batch

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        for name in ("input", "tokenizer", "output_prefix"):
            if not getattr(self, name):
                raise ConfigError(f"preprocess.{name} is required")
        if self.executor not in EXECUTORS:
            raise ConfigError(
                f"preprocess.executor: {self.executor!r}, expected one of {EXECUTORS}"
            )
        if self.shard_mb <= 0:
            raise ConfigError("preprocess.shard_mb must be positive")
        for name in ("batch_size", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"preprocess.{name} must be at least 1")


@dataclass
class ShardResult:
    """One shard's documents as concatenated tokens plus lengths, and what was skipped."""

    tokens: np.ndarray
    sizes: np.ndarray
    skipped: list[Skipped]
    lines: int  # lines read, to turn the next shard's relative line numbers into absolute ones


@dataclass
class PreprocessSummary:
    output_prefix: str
    tokenizer: str
    inputs: list[str]
    dtype: str
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens "
            f"({self.dtype}) in {self.seconds:.1f} s ({rate:,.0f} tokens/s); skipped: {skipped}"
        )


ProgressFn = Callable[[int, int], None]


@lru_cache(maxsize=2)
def _tokenizer_from_json(tokenizer_json: str) -> TextTokenizer:
    return TextTokenizer(Tokenizer.from_str(tokenizer_json), "<in memory>")


def _prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` on a background thread, `depth` ahead (encode_batch releases the GIL)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
        except BaseException as err:  # re-raised in the consuming thread
            buffer.put(err)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _text_batches(
    records: Iterable, batch_size: int, skipped: list[Skipped]
) -> Iterator[list[str]]:
    batch: list[str] = []
    for record in records:
        if isinstance(record, Document):
            batch.append(record.text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        else:
            skipped.append(record)
    if batch:
        yield batch


def _to_arrays(ids: list[list[int]], eod: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by `eod`, into one token array plus sizes."""
    sizes = np.fromiter((len(doc) + 1 for doc in ids), np.int32, len(ids))
    ends = np.cumsum(sizes, dtype=np.int64)
    tokens = np.empty(int(ends[-1]), dtype)
    is_text = np.ones(len(tokens), bool)
    is_text[ends - 1] = False
    tokens[is_text] = np.fromiter(chain.from_iterable(ids), dtype, len(tokens) - len(ids))
    tokens[~is_text] = eod
    return tokens, sizes


def tokenize_shard(
    shard: Shard,
    tokenizer_json: str,
    text_field: str,
    batch_size: int,
    progress: ProgressFn | None = None,
) -> ShardResult:
    """Read, validate and tokenize one shard. A plain function: runs locally or as a Ray task."""
    tokenizer = _tokenizer_from_json(tokenizer_json)
    eod, dtype = tokenizer.eod_id, token_dtype(tokenizer.vocab_size)
    counter, skipped = LineCounter(), []
    token_pieces, size_pieces = [], []
    records = read_records(shard, text_field, counter)
    for texts in _prefetch(_text_batches(records, batch_size, skipped)):
        tokens, sizes = _to_arrays(tokenizer.encode_batch(texts), eod, dtype)
        token_pieces.append(tokens)
        size_pieces.append(sizes)
        if progress is not None:
            progress(len(sizes), len(tokens))
    return ShardResult(
        tokens=np.concatenate(token_pieces) if token_pieces else np.zeros(0, dtype),
        sizes=np.concatenate(size_pieces) if size_pieces else np.zeros(0, np.int32),
        skipped=skipped,
        lines=counter.lines,
    )


def _run_local(
    shards: list[Shard], cfg: PreprocessConfig, tokenizer_json: str, progress: ProgressFn
) -> Iterator[ShardResult]:
    for shard in shards:
        yield tokenize_shard(shard, tokenizer_json, cfg.text_field, cfg.batch_size, progress)


def _run_ray(
    shards: list[Shard], cfg: PreprocessConfig, tokenizer_json: str, progress: ProgressFn
) -> Iterator[ShardResult]:
    """Shards as Ray tasks, a bounded number in flight, results taken in shard order."""
    import ray

    from neoray.cluster.job_env import JobTask
    from neoray.cluster.ray_start import start_or_join

    start_or_join()
    task = JobTask(
        tokenize_shard,
        num_cpus=cfg.cpus_per_task,
        scheduling_strategy="SPREAD",  # every node reads and tokenizes
        # encode_batch's thread pool would otherwise take every core of the node.
        runtime_env={"env_vars": {"RAYON_NUM_THREADS": str(cfg.cpus_per_task)}},
    )
    tokenizer_ref = ray.put(tokenizer_json)
    in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)) // cfg.cpus_per_task)
    pending: deque = deque()
    for shard in shards:
        pending.append(task.remote(shard, tokenizer_ref, cfg.text_field, cfg.batch_size))
        if len(pending) >= in_flight:
            yield _collect(pending.popleft(), progress)
    while pending:
        yield _collect(pending.popleft(), progress)


def _collect(ref: object, progress: ProgressFn) -> ShardResult:
    import ray

    result = ray.get(ref)
    progress(len(result.sizes), len(result.tokens))
    return result


class _Progress:
    """A tqdm bar counting documents, with tokens/s alongside."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(unit=" docs", unit_scale=True, disable=not enabled, desc="tokenizing")
        self.tokens = 0
        self.start = time.perf_counter()

    def __call__(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(documents)
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)


def _remove_partials(prefix: str) -> None:
    for suffix in (".bin", ".idx", ".skipped.jsonl", ".report.json"):
        if os.path.exists(prefix + suffix + PARTIAL):
            os.remove(prefix + suffix + PARTIAL)


def _write_results(
    shards: list[Shard],
    results: Iterable[ShardResult],
    writer: IndexedDatasetWriter,
    report: TextIO,
    summary: PreprocessSummary,
) -> None:
    """Append each shard's documents in shard order; list skipped records with absolute lines."""
    lines_before: dict[str, int] = {}
    for shard, result in zip(shards, results, strict=True):
        first = lines_before.get(shard.uri, 0)
        lines_before[shard.uri] = first + result.lines
        for bad in result.skipped:
            summary.skipped[bad.kind] = summary.skipped.get(bad.kind, 0) + 1
            entry = {"file": shard.uri, "line": first + bad.line, "kind": bad.kind}
            report.write(json.dumps({**entry, "detail": bad.detail}) + "\n")
        writer.add_documents(result.tokens, result.sizes)
        summary.documents += len(result.sizes)
        summary.tokens += len(result.tokens)


def preprocess(cfg: PreprocessConfig, show_progress: bool = True) -> PreprocessSummary:
    """Tokenize `cfg.input` into `cfg.output_prefix`.{bin,idx} plus the skipped-records report.

    An `s3://` output prefix is written in a local temporary folder, then uploaded (the `.idx`
    last, `upload_token_files`)."""
    if not is_remote(cfg.output_prefix):
        return _preprocess(cfg, show_progress)
    with tempfile.TemporaryDirectory(prefix="neoray-preprocess-") as folder:
        local = os.path.join(folder, cfg.output_prefix.rsplit("/", 1)[-1])
        local_cfg = dataclasses.replace(cfg, output_prefix=local)
        summary = _preprocess(local_cfg, show_progress, published_as=cfg.output_prefix)
        upload_token_files(local, cfg.output_prefix, (".skipped.jsonl", ".report.json"))
    return summary


def _preprocess(
    cfg: PreprocessConfig, show_progress: bool, published_as: str | None = None
) -> PreprocessSummary:
    """`preprocess` into local files; the report names `published_as` as the output when
    the files are to be uploaded there."""
    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.backend.token_to_id(END_OF_TEXT) is None:
        raise ConfigError(f"preprocess.tokenizer: {cfg.tokenizer} has no {END_OF_TEXT} token")
    dtype = token_dtype(tokenizer.vocab_size)
    inputs = expand_inputs(cfg.input)
    shards = plan_shards(inputs, max(1, int(cfg.shard_mb * 2**20)))
    prefix = cfg.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    summary = PreprocessSummary(published_as or prefix, cfg.tokenizer, inputs, dtype.name)
    run = _run_ray if cfg.executor == "ray" else _run_local
    progress = _Progress(show_progress)
    try:
        writer = IndexedDatasetWriter(prefix, dtype)
        with open(prefix + ".skipped.jsonl" + PARTIAL, "w", encoding="utf-8") as report:
            results = run(shards, cfg, tokenizer.to_json(), progress)
            _write_results(shards, results, writer, report, summary)
        writer.finish()
        progress.bar.close()
        summary.seconds = time.perf_counter() - start
        with open(prefix + ".report.json" + PARTIAL, "w", encoding="utf-8") as f:
            json.dump(asdict(summary), f, indent=2)
        for suffix in (".skipped.jsonl", ".report.json"):
            os.replace(prefix + suffix + PARTIAL, prefix + suffix)
        publish(prefix)
    except BaseException:
        progress.bar.close()
        _remove_partials(prefix)
        raise
    return summary
