"""Reading raw text corpora as a stream: `.txt`, `.jsonl` and `.jsonl.zst`, local or `s3://`.

A corpus is given as paths, globs, directories or S3 URIs (`s3://bucket/prefix/*.jsonl`). Each
input expands to files; each file is read as one or more `Shard`s, and a shard yields records:
either a `Document` (text worth tokenizing) or a `Skipped` (a bad record, with the kind of
problem and its line). Nothing is read into memory beyond the record at hand.

File formats:
- `.jsonl` / `.jsonl.zst`: one JSON object per line, the text under a configurable field.
  Blank lines are not records and are passed over silently.
- `.txt`: the whole file is one document (a book, a source file).

Uncompressed `.jsonl` files can be split into byte ranges so that several workers read one large
file: a shard owns the lines that *start* inside its range. Line numbers in records are relative
to the shard, since where a byte range starts in lines is only known once the earlier shards
have been read; `read_records` reports each shard's line count so the caller can add them up.

S3 goes through boto3, which takes its endpoint and credentials from the usual places
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `~/.aws/config`, ...). An S3 URI behaves like a local
path: globs match within a folder (`**` across folders), a name that is no object is a folder,
and a missing object or refused credentials raise FileNotFoundError or PermissionError naming it.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

SUFFIXES = (".jsonl.zst", ".jsonl", ".txt")

# Kinds of skipped records, as they appear in reports.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
SKIP_KINDS = (MALFORMED_JSON, MISSING_FIELD, INVALID_UTF8, EMPTY_DOCUMENT)

# zstd frames of large corpora (e.g. the Pile) use long-distance windows up to 2 GiB.
_ZSTD_MAX_WINDOW = 2**31


@dataclass(frozen=True)
class Shard:
    """Bytes [start, end) of one input file; `end=None` means to the end of the file."""

    uri: str
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class Document:
    """A record with text to tokenize; `line` is 1-based within its shard."""

    text: str
    line: int


@dataclass(frozen=True)
class Skipped:
    """A record that was not used: `kind` is one of SKIP_KINDS, `line` is 1-based in its shard."""

    kind: str
    line: int
    detail: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _s3_client() -> Any:
    """The shared S3 client (see `neoray.storage.s3_client`): retries, and a new client when
    the AWS environment variables change."""
    from neoray.storage import s3_client

    return s3_client()


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """boto3's errors for `uri` as the storage layer maps them: FileNotFoundError or
    PermissionError, as a local path would give, naming the URI."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    from neoray.storage import s3_error

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise s3_error(uri, "read", err) from err


def _is_supported(name: str) -> bool:
    return name.endswith(SUFFIXES)


def _has_magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _glob_match(pattern: list[str], path: list[str]) -> bool:
    """Whether path segments match pattern segments as glob.glob(recursive=True) has it:
    `*`, `?` and `[...]` stay within one segment, `**` spans any number of them."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return (
        bool(path)
        and fnmatch.fnmatchcase(path[0], pattern[0])
        and _glob_match(pattern[1:], path[1:])
    )


def _list_s3(uri: str, bucket: str, prefix: str) -> list[str]:
    """Keys in `bucket` that start with `prefix`."""
    paginator = _s3_client().get_paginator("list_objects_v2")
    with _s3_errors(uri):
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]


def _expand_s3(uri: str) -> list[str]:
    """Like a local path: a glob, else the object of that name, else the folder of that name."""
    bucket, key = _split_s3(uri)
    if _has_magic(key):
        prefix = re.split(r"[*?[]", key, maxsplit=1)[0]
        segments = key.split("/")
        names = [k for k in _list_s3(uri, bucket, prefix) if _glob_match(segments, k.split("/"))]
        return sorted(f"s3://{bucket}/{name}" for name in names)
    names = _list_s3(uri, bucket, key)
    if key in names and not key.endswith("/"):
        return [uri]
    folder = key.rstrip("/") + "/" if key else ""
    return sorted(f"s3://{bucket}/{k}" for k in names if k.startswith(folder) and _is_supported(k))


def _expand_local(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        return sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(pattern)
            for name in names
            if _is_supported(name)
        )
    if _has_magic(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return [pattern] if os.path.isfile(pattern) else []


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Files named by paths, globs, directories or S3 URIs, in a stable (sorted) order.

    Raises FileNotFoundError for an input that matches nothing and ValueError for a file whose
    format is not supported, so that a typo fails before hours of work, not after.
    """
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    files: list[str] = []
    for pattern in patterns:
        matched = _expand_s3(pattern) if is_s3(pattern) else _expand_local(pattern)
        if not matched:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        for uri in matched:
            if not _is_supported(uri):
                raise ValueError(f"input {uri!r}: unsupported format, expected one of {SUFFIXES}")
        files.extend(matched)
    return files


def file_size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            return _s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    return os.path.getsize(uri)


class _RawStream(io.RawIOBase):
    """Adapts anything with `read(n)` (an S3 body, a zstd reader) for io.BufferedReader."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._source.close()
        super().close()


def open_bytes(uri: str, start: int = 0, stop: int | None = None) -> BinaryIO:
    """A buffered binary stream of the raw file from byte `start` (S3: a ranged GET), up to
    byte `stop` when given (S3 then sends no more than that)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        # No range from 0 to the end: S3 refuses any range of an empty object (416 InvalidRange).
        end = "" if stop is None else str(stop - 1)
        ranged = {"Range": f"bytes={start}-{end}"} if start or stop is not None else {}
        with _s3_errors(uri):
            body = _s3_client().get_object(Bucket=bucket, Key=key, **ranged)["Body"]
        return io.BufferedReader(_RawStream(body), buffer_size=1 << 20)
    stream = open(uri, "rb", buffering=1 << 20)  # noqa: SIM115 (returned to the caller)
    stream.seek(start)
    return stream


def read_bytes(uri: str) -> bytes:
    """The whole file, local or S3 (for small files such as a tokenizer.json)."""
    with open_bytes(uri) as stream:
        return stream.read()


def _open_decompressed(uri: str) -> BinaryIO:
    import zstandard

    raw = open_bytes(uri)
    reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(raw)
    return io.BufferedReader(_RawStream(reader), buffer_size=1 << 20)


def plan_shards(uris: Sequence[str], shard_bytes: int) -> list[Shard]:
    """Shards in input order: uncompressed `.jsonl` files larger than `shard_bytes` are cut
    into byte ranges of about that size; other files are one shard each."""
    shards = []
    for uri in uris:
        size = file_size(uri) if uri.endswith(".jsonl") else 0
        if size <= shard_bytes:
            shards.append(Shard(uri))
            continue
        starts = range(0, size, shard_bytes)
        shards.extend(Shard(uri, s, min(s + shard_bytes, size)) for s in starts)
    return shards


def _lines(shard: Shard) -> Iterator[bytes]:
    """The lines owned by `shard`: those whose first byte lies in [start, end)."""
    if shard.uri.endswith(".zst"):
        with _open_decompressed(shard.uri) as stream:
            yield from stream
        return
    with open_bytes(shard.uri, max(shard.start - 1, 0)) as stream:
        position = max(shard.start - 1, 0)
        if shard.start > 0:
            # The line under way at `start` belongs to the previous shard. Starting one byte
            # early means a line that begins exactly at `start` is not skipped.
            position += len(stream.readline())
        for line in stream:
            if shard.end is not None and position >= shard.end:
                return
            yield line
            position += len(line)


def _first_bad_line(data: bytes, err: UnicodeDecodeError) -> int:
    return data.count(b"\n", 0, err.start) + 1


def _read_txt(shard: Shard) -> Iterator[Document | Skipped]:
    data = read_bytes(shard.uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield Skipped(INVALID_UTF8, _first_bad_line(data, err), str(err))
        return
    if text.strip():
        yield Document(text, 1)
    else:
        yield Skipped(EMPTY_DOCUMENT, 1, "file has no text")


def _parse_jsonl_line(raw: bytes, line: int, text_field: str) -> Document | Skipped:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Skipped(INVALID_UTF8, line, str(err))
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as err:
        return Skipped(MALFORMED_JSON, line, f"{err.msg} at column {err.colno}")
    if not isinstance(record, dict):
        return Skipped(MALFORMED_JSON, line, f"a JSON {type(record).__name__}, not an object")
    text = record.get(text_field)
    if not isinstance(text, str):
        found = "absent" if text_field not in record else f"a {type(text).__name__}"
        return Skipped(MISSING_FIELD, line, f"field {text_field!r} is {found}, not a string")
    if "\\ud" in decoded.lower():
        # JSON escapes can spell lone surrogates, which are not valid Unicode text.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return Skipped(INVALID_UTF8, line, f"field {text_field!r}: {err.reason}")
    if not text.strip():
        return Skipped(EMPTY_DOCUMENT, line, f"field {text_field!r} has no text")
    return Document(text, line)


@dataclass
class LineCounter:
    """How many lines a shard held, known once its records have been read."""

    lines: int = 0


def read_records(
    shard: Shard, text_field: str = "text", counter: LineCounter | None = None
) -> Iterator[Document | Skipped]:
    """Records of one shard in file order; `counter.lines` ends as the shard's line count."""
    counter = counter if counter is not None else LineCounter()
    if shard.uri.endswith(".txt"):
        for record in _read_txt(shard):
            counter.lines = 1
            yield record
        return
    for number, raw in enumerate(_lines(shard), start=1):
        counter.lines = number
        if raw.strip():
            yield _parse_jsonl_line(raw, number, text_field)


def iter_texts(
    inputs: str | Sequence[str], text_field: str = "text", skipped: dict[str, int] | None = None
) -> Iterator[str]:
    """Just the document texts of a corpus; bad records are counted by kind in `skipped`."""
    for uri in expand_inputs(inputs):
        for record in read_records(Shard(uri), text_field):
            if isinstance(record, Document):
                yield record.text
            elif skipped is not None:
                skipped[record.kind] = skipped.get(record.kind, 0) + 1
