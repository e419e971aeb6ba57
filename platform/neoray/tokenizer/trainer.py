"""Training a GPT-NeoX-style byte-level BPE tokenizer with the `tokenizers` library.

The result has the structure of the released GPT-NeoX-20B `tokenizer.json`: NFC normalization,
byte-level pre-tokenization without a prefix space, `<|endoftext|>` = 0 and `<|padding|>` = 1,
and (by default) added tokens for runs of 2..24 spaces at the top of the vocabulary.

Whitespace runs. An added token is matched in the raw text before BPE sees it, so once the
space-run tokens exist, runs of 2+ spaces never reach the BPE model. Training therefore removes
those runs from its view of the text; merges of spaces would be unreachable vocabulary. The
space-run tokens help prose with aligned columns, but on indented code they cost tokens at equal
vocabulary size: plain byte-level BPE keeps a newline together with the indentation after it
("\\n" + 7 spaces is one token, then " def"), while the added tokens cut it ("\\n", 8 spaces,
"def"). `space_runs=None` trains that plain scheme, which is not NeoX-compatible but compresses
code-heavy corpora better (see bench/tokenizer_compression.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from neoray.config import ConfigError
from neoray.corpus import iter_texts
from neoray.tokenizer.load import END_OF_TEXT, PADDING, TextTokenizer

BYTE_ALPHABET = 256


@dataclass
class TokenizerTrainConfig:
    """What to train on and what to build.

    `vocab_size` counts every id, special and space-run tokens included (50,277 for NeoX-20B).
    `space_runs` is [shortest, longest] run of spaces that gets its own token, or None.
    """

    input: list[str]
    output: str
    vocab_size: int = 50277
    special_tokens: list[str] = field(default_factory=lambda: [END_OF_TEXT, PADDING])
    space_runs: list[int] | None = field(default_factory=lambda: [2, 24])
    text_field: str = "text"
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ConfigError("train_tokenizer.input: give at least one path, glob or s3:// URI")
        if not self.output or self.output.startswith("s3://"):
            raise ConfigError("train_tokenizer.output: give a local path for tokenizer.json")
        if not self.special_tokens or len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(
                "train_tokenizer.special_tokens: give distinct tokens, e.g. [<|endoftext|>]"
            )
        runs = self.space_runs
        if runs is not None and (len(runs) != 2 or not 2 <= runs[0] <= runs[1]):
            raise ConfigError(
                "train_tokenizer.space_runs: give [shortest, longest] with 2 <= shortest <= "
                "longest (NeoX: [2, 24]), or null for no space-run tokens"
            )
        smallest = BYTE_ALPHABET + len(self.special_tokens) + len(self.space_run_tokens()) + 1
        if self.vocab_size < smallest:
            raise ConfigError(
                f"train_tokenizer.vocab_size: {self.vocab_size} leaves no room for merges; "
                f"use at least {smallest}"
            )

    def space_run_tokens(self) -> list[str]:
        """The space-run tokens, longest first (their order in the released 20B vocabulary)."""
        if self.space_runs is None:
            return []
        shortest, longest = self.space_runs
        return [" " * n for n in range(longest, shortest - 1, -1)]


def _byte_level() -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)


def build_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """An untrained tokenizer with the NeoX pipeline and the pre-tokenizer used for training."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _byte_level()
    if cfg.space_runs is not None:
        shortest, longest = cfg.space_runs
        runs = pre_tokenizers.Split(Regex(f" {{{shortest},{longest}}}"), behavior="removed")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([runs, _byte_level()])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(cfg: TokenizerTrainConfig, show_progress: bool = True) -> TextTokenizer:
    """Train on the corpus as a stream and write `cfg.output` (atomically)."""
    tokenizer = build_tokenizer(cfg)
    space_tokens = cfg.space_run_tokens()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - len(space_tokens),
        min_frequency=cfg.min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in cfg.special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    skipped: dict[str, int] = {}
    tokenizer.train_from_iterator(iter_texts(cfg.input, cfg.text_field, skipped), trainer)
    if skipped:
        print(f"skipped records while training: {skipped}")
    tokenizer.pre_tokenizer = _byte_level()
    tokenizer.add_tokens([AddedToken(t, normalized=True) for t in space_tokens])
    if tokenizer.get_vocab_size() < cfg.vocab_size:
        print(
            f"the corpus supports only {tokenizer.get_vocab_size()} of {cfg.vocab_size} tokens "
            "(every pair that occurs at least min_frequency times was merged)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    partial = cfg.output + ".partial"
    tokenizer.save(partial)
    os.replace(partial, cfg.output)
    return TextTokenizer(tokenizer, cfg.output)
