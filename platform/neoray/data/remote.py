"""Token files in S3 (`data.components.<name>.prefix=s3://bucket/folder/name`), read by every
node without a filesystem that all of them mount.

Each process reads the `.idx` whole (twelve bytes per document, a few percent of the `.bin`)
into a local cache, and the `.bin` a block at a time (BLOCK_BYTES, fetched by byte range) into
the same cache, kept under a size bound: the blocks used longest ago are deleted first. Cached
files are named by the object's ETag and size, never by its name alone, so a rebuilt `.bin`
under the same name is never served from the old one's blocks; every ranged read also asks
for that ETag (If-Match), so an object replaced while a run reads it fails the read, naming
it, instead of mixing two versions. Samples, their order and `fingerprint` are the same as
from local copies of the files: the bytes are.

The cache is a folder of this machine: NEORAY_TOKEN_CACHE (default ~/.cache/neoray/tokens),
at most NEORAY_TOKEN_CACHE_GB gigabytes of blocks (default 100). The processes of a node share
it: each writes a block under a temporary name and renames it into place.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoray.config import ConfigError
from neoray.storage import cached_object, publish_file, s3_client, s3_error

SCHEME = "s3://"
CACHE_VARIABLE = "NEORAY_TOKEN_CACHE"
BOUND_VARIABLE = "NEORAY_TOKEN_CACHE_GB"
DEFAULT_BOUND_GB = 100.0
BLOCK_BYTES = 4 << 20  # one ranged GET; a sample of 2,049 uint16 tokens is 4 KiB
OPEN_BLOCKS = 64  # blocks each process keeps mapped (the least recently read are closed)


def is_remote(prefix: str) -> bool:
    return prefix.startswith(SCHEME)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "neoray" / "tokens")


def cache_bound() -> int:
    """The bytes of blocks the cache may hold (NEORAY_TOKEN_CACHE_GB)."""
    text = os.environ.get(BOUND_VARIABLE)
    try:
        gigabytes = DEFAULT_BOUND_GB if text is None else float(text)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise ConfigError(
            f"{BOUND_VARIABLE}={text!r}: give the token cache's size in gigabytes, e.g. 100"
        )
    return int(gigabytes * 2**30)


def index_folder(prefix: str) -> str:
    """The local folder of the sample-order index files of the token files at `prefix`
    (`index_cache`): next to local files, and in the cache for files in S3."""
    if is_remote(prefix):
        return str(cache_root() / "index" / prefix[len(SCHEME) :].rsplit("/", 1)[0])
    return os.path.dirname(os.path.abspath(prefix))


@dataclass(frozen=True)
class RemoteObject:
    """One S3 object as it is now: its version (ETag) and size."""

    uri: str
    bucket: str
    key: str
    etag: str
    size: int

    @classmethod
    def look_up(cls, uri: str) -> RemoteObject:
        """The object at `uri`; FileNotFoundError (naming it) when there is none."""
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as err:
            raise s3_error(uri, "lookup of", err) from err
        return cls(uri, bucket, key, head["ETag"], int(head["ContentLength"]))

    @property
    def version(self) -> str:
        """ETag and size, as a file name: what the cache keys this object's bytes on."""
        name = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return f"{name}-{self.etag.strip(chr(34))}-{self.size}"

    def read(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of this version of the object (clipped to its end)."""
        stop = min(stop, self.size)
        if stop <= start:
            return b""
        try:
            response = s3_client().get_object(
                Bucket=self.bucket,
                Key=self.key,
                Range=f"bytes={start}-{stop - 1}",
                IfMatch=self.etag,
            )
            data = response["Body"].read()
        except Exception as err:
            raised = s3_error(self.uri, "read of", err)
            if "PreconditionFailed" in str(err):
                raised = FileNotFoundError(
                    f"{self.uri}: replaced while this run reads it (it was ETag {self.etag}); "
                    "token files must not change under a running job"
                )
            raise raised from err
        if len(data) != stop - start:
            raise OSError(f"{self.uri}: bytes {start}-{stop} gave {len(data)} bytes")
        return data


def cached_copy(uri: str) -> Path:
    """A local copy of the whole object at `uri` (an `.idx`), downloaded once per version."""
    return cached_object(uri, cache_root() / "whole")


class BlockCache:
    """The `.bin` of `obj` as an array of `dtype` tokens, read a block at a time through the
    node's bounded cache (`tokens[a:b]` is all a reader needs)."""

    def __init__(self, obj: RemoteObject, dtype: np.dtype) -> None:
        self.obj, self.dtype = obj, np.dtype(dtype)
        self.folder = cache_root() / "blocks" / obj.version
        self._tokens = obj.size // self.dtype.itemsize
        self._per_block = BLOCK_BYTES // self.dtype.itemsize
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self._tokens

    def __getitem__(self, where: slice) -> np.ndarray:
        """Tokens [where.start, where.stop): both given, within the file (as
        `IndexedDataset` slices it; this sits on the path of every sample)."""
        start, stop, per_block = where.start, where.stop, self._per_block
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = start // per_block
        if stop <= (first + 1) * per_block:  # most samples: one block, no copy
            base = first * per_block
            return self._block(first)[start - base : stop - base]
        pieces = [
            self._block(b)[max(start, b * per_block) - b * per_block : stop - b * per_block]
            for b in range(first, (stop - 1) // per_block + 1)
        ]
        return np.concatenate(pieces)

    def peek(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) read straight from S3 (through no block): for the few spread
        reads at a run's start (`fingerprint`, the token-id check), which would otherwise pull
        whole blocks into the cache."""
        size = self.dtype.itemsize
        return np.frombuffer(self.obj.read(start * size, stop * size), self.dtype)

    def _block(self, block: int) -> np.ndarray:
        """Block `block`'s tokens, mapped from the cache (fetched into it first if missing)."""
        data = self._open.get(block)
        if data is not None:
            self._open.move_to_end(block)
            return data
        path = self.folder / f"{block}.blk"
        try:
            data = _mapped(path, self.dtype)
            os.utime(path)  # recently used: the last to be evicted
        except FileNotFoundError:
            start = block * BLOCK_BYTES
            publish_file(path, lambda out: out.write(self.obj.read(start, start + BLOCK_BYTES)))
            evict(cache_root() / "blocks", cache_bound(), keep=path)
            data = _mapped(path, self.dtype)
        self._open[block] = data
        if len(self._open) > OPEN_BLOCKS:
            self._open.popitem(last=False)
        return data


def _mapped(path: Path, dtype: np.dtype) -> np.ndarray:
    """The file's bytes as a read-only array of `dtype`, memory-mapped (a plain ndarray over
    the map: slicing it is cheaper than slicing an np.memmap)."""
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype)


def evict(folder: Path, bound: int, keep: Path) -> None:
    """Delete the blocks under `folder` used longest ago until they hold at most `bound` bytes
    (never `keep`, the block just fetched). A process that has a deleted block mapped keeps
    reading it; one that looks for it fetches it again."""
    blocks = []
    for path in folder.glob("*/*.blk"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        blocks.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in blocks)
    for _, size, path in sorted(blocks, key=lambda b: b[0]):
        if total <= bound:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


def upload_token_files(local_prefix: str, prefix: str, suffixes: tuple[str, ...] = ()) -> None:
    """Publish the token files at `local_prefix` to the `s3://` `prefix`, in the order local
    files are published: any old `.idx` deleted first, the `.bin` (and `suffixes`, e.g. the
    preprocessing report) next, the `.idx` last. A reader that finds the `.idx` finds the
    `.bin` that goes with it; an upload cut short leaves no `.idx`."""
    from neoray.storage import storage_from_uri

    storage, key = storage_from_uri(prefix)
    storage.delete(key + ".idx")
    for suffix in (".bin", *suffixes, ".idx"):
        storage.upload_file(local_prefix + suffix, key + suffix)
