"""Weights to start a run from, read tensor by tensor and slice by slice.

A source holds the full `GPTNeoX` tensors, each stored whole or as the tensor-parallel slices
of the run that saved it. `Stored.copy_into` copies one range of a full tensor along its split
dimension (`neoray.parallel.convert.split_dim`) into a rank's parameter, one stored piece at a
time, touching only the stored bytes of that range: safetensors files are read by slice
(`safe_open(...).get_slice`), `torch.save` files are memory-mapped
(`torch.load(mmap=True, weights_only=True)`: tensors only, nothing read until sliced). So a rank of a tp x pp layout reads its stage's tensors and, of each, its
tensor-parallel slice: never the whole model.

Three kinds (`open_source` tells them apart with the metadata alone, before any weight moves):
- a Hugging Face GPTNeoX directory, local or `s3://`: `config.json` with `model.safetensors`,
  or a sharded `model.safetensors.index.json`, or a single `pytorch_model.bin` (loaded with
  `weights_only=True`; a sharded `pytorch_model.bin.index.json` is refused). From S3 a
  safetensors file is read by byte ranges: its header, then each of this rank's slices.
- a committed checkpoint of another run: its per-layer files
  (`layer_<LL>-model_<TT>-model_states.pt`, the weights as trained, at that run's tp), only
  those of this rank's stage, downloaded and sha256-verified against its manifest.
- a local `torch.save` file of a full `GPTNeoX` state dict (plain names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from neoray.checkpoint.manifest import Manifest, checkpoint_key, download, safe_name
from neoray.config import ConfigError
from neoray.corpus import open_bytes
from neoray.model.gpt_neox import NeoXConfig
from neoray.model.hf import (
    LEGACY_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    from_hf_config,
    from_hf_name,
)
from neoray.parallel.convert import split_dim, to_pipeline_name
from neoray.storage import LocalStorage, Storage, join_key

LEGACY_INDEX_FILE = "pytorch_model.bin.index.json"


class _Mapped:
    """A memory-mapped tensor: indexing copies out only the indexed elements."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def __getitem__(self, index: tuple) -> torch.Tensor:
        return self.tensor[index].clone()


class _Safe:
    """A tensor in a safetensors file: indexing reads only the indexed bytes."""

    def __init__(self, handle: Any, key: str) -> None:
        self.slice = handle.get_slice(key)
        self.shape = tuple(self.slice.get_shape())

    def __getitem__(self, index: tuple) -> torch.Tensor:
        return self.slice[index]


# safetensors' dtype names, of the dtypes a model's weights come in
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_into(stream: BinaryIO, buffer: memoryview, uri: str) -> None:
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(buffer[filled:])
        if not got:
            raise ConfigError(f"{uri}: ends before the tensor its header describes")
        filled += got


class _Ranged:
    """A tensor of a safetensors file in an object store, read by byte ranges (never the whole
    file): rows (dim 0) are one range; columns (dim 1) are streamed row by row over the rows'
    range, keeping only the wanted columns of each row (held: the slice and one row)."""

    def __init__(self, uri: str, entry: dict, data_start: int) -> None:
        if entry["dtype"] not in _DTYPES:
            raise ConfigError(f"{uri}: tensor dtype {entry['dtype']} is not a weight's dtype")
        self.uri, self.dtype, self.shape = uri, _DTYPES[entry["dtype"]], tuple(entry["shape"])
        self.start = data_start + entry["data_offsets"][0]

    def __getitem__(self, index: tuple) -> torch.Tensor:
        item = torch.empty((), dtype=self.dtype).element_size()
        inner = math.prod(self.shape[2:]) * item  # bytes of one element of dim 1
        row = math.prod(self.shape[1:]) * item
        first, last, _ = index[0].indices(self.shape[0])
        a, b, _ = (index[1] if len(index) > 1 else slice(None)).indices(
            self.shape[1] if len(self.shape) > 1 else 1
        )
        shape = (last - first, *((b - a,) if len(self.shape) > 1 else ()), *self.shape[2:])
        keep = (b - a) * inner if len(self.shape) > 1 else row
        data = bytearray((last - first) * keep)
        with open_bytes(self.uri, self.start + first * row, self.start + last * row) as stream:
            if keep == row:  # whole rows: one range
                _read_into(stream, memoryview(data), self.uri)
            else:
                line = memoryview(bytearray(row))
                for r in range(last - first):
                    _read_into(stream, line, self.uri)
                    data[r * keep : (r + 1) * keep] = line[a * inner : b * inner]
        return torch.frombuffer(data, dtype=self.dtype).reshape(shape)


def safetensors_header(uri: str) -> tuple[dict, int]:
    """The tensors a safetensors file in an object store lists (name -> dtype, shape and
    byte offsets), and where its data starts: its first 8 + header-length bytes only."""
    with open_bytes(uri, 0, 8) as stream:
        length = int.from_bytes(stream.read(8), "little")
    with open_bytes(uri, 8, 8 + length) as stream:
        header = json.loads(stream.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


@dataclass
class Stored:
    """One full tensor as stored: whole (`dim` None), or as slices joined along `dim`."""

    parts: list[_Mapped | _Safe | _Ranged]
    dim: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        if self.dim is not None:
            shape[self.dim] = sum(part.shape[self.dim] for part in self.parts)
        return tuple(shape)

    def copy_into(
        self, target: torch.Tensor, dim: int | None, start: int = 0, stop: int = 0
    ) -> list[int]:
        """Copy elements [start, stop) of the full tensor along `dim` (all of it when None)
        into `target`, one stored piece at a time; the bytes of each piece read."""
        if dim is None:
            spans = [(self.parts[0], (slice(None),) * target.dim(), target)]
        elif self.dim is None or len(self.parts) == 1:
            spans = [(self.parts[0], _along(dim, start, stop), target)]
        else:  # slices of another tensor-parallel layout: the ones that overlap [start, stop)
            spans, offset = [], 0
            for part in self.parts:
                size = part.shape[dim]
                first, last = max(start, offset), min(stop, offset + size)
                if first < last:
                    into = target.narrow(dim, first - start, last - first)
                    spans.append((part, _along(dim, first - offset, last - offset), into))
                offset += size
        sizes = []
        for part, index, into in spans:
            piece = part[index]
            with torch.no_grad():
                into.copy_(piece)
            sizes.append(piece.nbytes)
            del piece
        return sizes


def _along(dim: int, start: int, stop: int) -> tuple:
    return (*(slice(None),) * dim, slice(start, stop))


@dataclass
class Opened:
    """The stored tensors a rank asked for (plain names), and the files it read them from."""

    tensors: dict[str, Stored]
    files: list[str] = field(default_factory=list)


def _local_folder(storage: Storage, key: str) -> Path | None:
    return storage.root / key if isinstance(storage, LocalStorage) else None


def _mapped(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:  # not a zip-format torch file: mmap cannot read it
        raise ConfigError(
            f"{path}: not a torch.save file that can be memory-mapped ({err})"
        ) from err


@dataclass
class HFDirectory:
    """A Hugging Face GPTNeoX directory in `storage` under `key`."""

    what: str
    storage: Storage
    key: str
    config: NeoXConfig
    weights: str  # WEIGHTS_FILE, WEIGHTS_INDEX_FILE or LEGACY_WEIGHTS_FILE
    weight_map: dict[str, str]  # plain name -> file (an index's; empty for one file)

    def open(self, names: set[str], scratch: Path) -> Opened:
        if self.weights == WEIGHTS_INDEX_FILE:
            missing = sorted(names - set(self.weight_map))
            if missing:
                raise ConfigError(
                    f"{self.what}: {WEIGHTS_INDEX_FILE} lists no {missing[0]} "
                    f"(and {len(missing) - 1} more tensors of this rank)"
                )
            files = sorted({self.weight_map[name] for name in names})
        else:
            files = [self.weights]
        local = _local_folder(self.storage, self.key)
        stored: dict[str, Stored] = {}
        for file in files:
            safe_name(file, self.what)
            if file == LEGACY_WEIGHTS_FILE:
                if local is None:
                    self.storage.download_file(join_key(self.key, file), scratch / file)
                for key, tensor in _mapped((local or scratch) / file).items():
                    if (name := from_hf_name(key)) in names:
                        stored[name] = Stored([_Mapped(tensor)], None)
            elif local is not None:
                handle = safe_open(local / file, framework="pt")
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    if (name := from_hf_name(key)) in names:
                        stored[name] = Stored([_Safe(handle, key)], None)
            else:
                uri = self.storage.uri(join_key(self.key, file))
                header, data_start = safetensors_header(uri)
                for key, entry in header.items():
                    if (name := from_hf_name(key)) in names:
                        stored[name] = Stored([_Ranged(uri, entry, data_start)], None)
        missing = sorted(names - set(stored))
        if missing:
            raise ConfigError(
                f"{self.what}: no tensor {missing[0]} (and {len(missing) - 1} more of this rank) "
                f"in {', '.join(files)}"
            )
        return Opened(stored, files)


def hf_directory(storage: Storage, key: str, what: str) -> HFDirectory:
    """The directory's config and which weights files it has; only small files are read."""
    try:
        hf = json.loads(storage.get_bytes(join_key(key, "config.json")))
        config = from_hf_config(hf)
    except FileNotFoundError as err:
        raise ConfigError(f"{what}: no config.json; not a Hugging Face model directory") from err
    except (CheckpointError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from err
    for weights in (WEIGHTS_INDEX_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if storage.exists(join_key(key, weights)):
            break
    else:
        legacy_index = storage.exists(join_key(key, LEGACY_INDEX_FILE))
        raise ConfigError(
            f"{what}: no {WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or {LEGACY_WEIGHTS_FILE}"
            + (
                f"; its sharded {LEGACY_INDEX_FILE} (pickle files) is not read: save it again "
                "with safetensors (GPTNeoXForCausalLM.from_pretrained(d).save_pretrained(out))"
                if legacy_index
                else ""
            )
        )
    weight_map = {}
    if weights == WEIGHTS_INDEX_FILE:
        index = json.loads(storage.get_bytes(join_key(key, WEIGHTS_INDEX_FILE)))
        weight_map = {
            name: file for k, file in index["weight_map"].items() if (name := from_hf_name(k))
        }
    return HFDirectory(what, storage, key, config, weights, weight_map)


@dataclass
class RunCheckpoint:
    """A committed checkpoint of a run: `manifest`'s files in `storage`."""

    what: str
    storage: Storage
    manifest: Manifest

    @property
    def config(self) -> NeoXConfig:
        return NeoXConfig(**self.manifest.model)

    def open(self, names: set[str], scratch: Path) -> Opened:
        from neoray.checkpoint.export import LAYER_FILE  # the layer files export reads

        config = self.config
        layers = {int(to_pipeline_name(name, config).split(".", 1)[0]) for name in names}
        files = sorted(
            e.path
            for e in self.manifest.files
            if (match := LAYER_FILE.fullmatch(e.path)) and int(match[1]) in layers
        )
        folder = _local_folder(
            self.storage, checkpoint_key(self.manifest.run_name, self.manifest.step)
        )
        if folder is None:
            folder = download(self.storage, self.manifest, scratch, files)
        parts: dict[str, dict[int, _Mapped]] = {}
        for file in files:
            match = LAYER_FILE.fullmatch(file)
            layer, tp_rank = int(match[1]), int(match[2])
            for key, tensor in _mapped(folder / file).items():
                plain = _plain(layer, key, config)
                parts.setdefault(plain, {})[tp_rank] = _Mapped(tensor)
        stored = {
            name: Stored([by_rank[t] for t in sorted(by_rank)], split_dim(name))
            for name, by_rank in parts.items()
            if name in names
        }
        missing = sorted(names - set(stored))
        if missing:
            raise ConfigError(
                f"{self.what}: its layer files hold no {missing[0]} (and {len(missing) - 1} "
                "more tensors of this rank)"
            )
        return Opened(stored, files)


def _plain(layer: int, key: str, config: NeoXConfig) -> str:
    return key if not 1 <= layer <= config.num_layers else f"layers.{layer - 1}.{key}"


@dataclass
class StateDictFile:
    """A local `torch.save` file of a full `GPTNeoX` state dict, under its plain names."""

    what: str
    path: Path
    config: None = None  # the file says nothing of the shape beyond its tensors

    def open(self, names: set[str], scratch: Path) -> Opened:
        tensors = _mapped(self.path)
        missing = sorted(names - set(tensors))
        if missing:
            raise ConfigError(
                f"{self.what}: the state dict has no {missing[0]} (and {len(missing) - 1} more "
                "tensors of this rank)"
            )
        stored = {name: Stored([_Mapped(tensors[name])], None) for name in names}
        return Opened(stored, [self.path.name])


Source = HFDirectory | RunCheckpoint | StateDictFile
