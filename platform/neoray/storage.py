"""Where checkpoints live: a local directory or an S3 bucket, behind one small interface.

Keys are "/"-separated paths relative to the storage root (`<root>` locally, `<bucket>/<prefix>`
on S3). Both backends publish a file whole or not at all: locally a temporary file is renamed
into place; on S3 an object only appears once its (multipart) upload completed.

S3 goes through boto3's managed transfers (multipart, concurrent parts) with botocore's retries
and backoff. Credentials come only from the standard AWS environment variables (or a profile):
they are never part of a `StorageConfig`, its repr, a log line or a manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from neoray.config import ConfigError
from neoray.file_lock import exclusive

KINDS = ("local", "s3")
RETRY_MODES = ("standard", "adaptive")
MiB = 1 << 20


log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage operation failed (after retries); the message names the URI."""


class StorageAccessDenied(StorageError, PermissionError):
    """The credentials were refused; a PermissionError, as for a local path."""


@dataclass
class StorageConfig:
    """A local directory (`kind=local`, under `root`) or an S3 bucket (`kind=s3`)."""

    kind: str = "local"
    root: str = "runs"  # local: the directory that holds <run_name>/checkpoints/...
    bucket: str | None = None
    prefix: str = ""  # s3: keys start with this folder
    endpoint_url: str | None = None  # s3: None means AWS_ENDPOINT_URL(_S3) or AWS itself
    region: str | None = None
    max_attempts: int = 5  # per request, including the first (botocore retries with backoff)
    retry_mode: str = "adaptive"  # botocore's retry mode: standard | adaptive (client-side rate)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_chunk_mb: int = 16  # files above this size are uploaded in parts of this size
    max_concurrency: int = 8  # parts in flight per file

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"storage.kind={self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind == "s3" and not self.bucket:
            raise ConfigError("storage=s3 needs a bucket: set storage.bucket=<name>")
        if self.retry_mode not in RETRY_MODES:
            raise ConfigError(
                f"storage.retry_mode={self.retry_mode!r}: choose one of {', '.join(RETRY_MODES)}"
            )
        if self.max_attempts < 1:
            raise ConfigError("storage.max_attempts must be at least 1 (the first try counts)")
        if self.multipart_chunk_mb < 5:
            raise ConfigError("storage.multipart_chunk_mb must be at least 5 (S3's minimum part)")
        if self.max_concurrency < 1:
            raise ConfigError("storage.max_concurrency must be at least 1")


def join_key(*parts: str) -> str:
    """Parts joined by "/", empty parts and stray slashes dropped."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage(Protocol):
    """What checkpoints need from a store; keys are relative to its root."""

    config: StorageConfig  # what opens the same store again (in another process)

    def upload_file(self, local_path: str | Path, key: str) -> None: ...
    def download_file(self, key: str, local_path: str | Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...
    def folders(self, prefix: str) -> list[str]: ...
    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...
    def put_if(self, key: str, data: bytes, version: str | None) -> str | None: ...


def publish_file(local_path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file next to `local_path`, then rename it into place:
    a reader (or a crash) never sees a half-written file under the final name."""
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, local_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The lock of a local storage's conditional writes: a private file at its root, not a lock on
# the folders, which any user who can read them could hold (see neoray.file_lock).
LOCK_FILE = ".neoray.lock"


class LocalStorage:
    """Files under a local directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.config = StorageConfig(root=str(self.root))

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / join_key(key) if join_key(key) else self.root

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        with open(local_path, "rb") as source:
            publish_file(self._path(key), lambda out: shutil.copyfileobj(source, out, 16 * MiB))

    def download_file(self, key: str, local_path: str | Path) -> None:
        try:
            with open(self._path(key), "rb") as source:
                publish_file(
                    Path(local_path), lambda out: shutil.copyfileobj(source, out, 16 * MiB)
                )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri(key)}: not found") from err

    def put_bytes(self, key: str, data: bytes) -> None:
        publish_file(self._path(key), lambda out: out.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri(key)}: not found") from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys that start with `prefix` (temporary files of unfinished writes excluded)."""
        prefix = prefix.lstrip("/")
        base = self._path(prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not base.is_dir():
            return []
        keys = []
        for directory, _, names in os.walk(base):
            for name in names:
                if (name.startswith(".") and name.endswith(".tmp")) or name == LOCK_FILE:
                    continue
                key = Path(directory, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file (if present) and the folders it leaves empty, up to the root."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under folder `prefix` (one directory read)."""
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(base) if entry.is_dir())

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The file's bytes and their version (sha256), or None when absent."""
        try:
            data = self.get_bytes(key)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, version: str | None) -> str | None:
        """Write `data` only if the file is still at `version` (None: only if absent), as S3's
        conditional writes do; the new version, or None when another writer changed it first.
        Writers serialize on the storage's private lock file, so one of two racers wins (these
        writes are a few small files: one lock for the whole root is enough)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / LOCK_FILE):
            current = self.read_versioned(key)
            if (current[1] if current else None) != version:
                return None
            publish_file(path, lambda out: out.write(data))
            return hashlib.sha256(data).hexdigest()


# The environment variables that configure boto3's S3 client. A process that changes them (a
# test, a worker given new credentials) gets a new client rather than a stale cached one.
S3_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int = 5,
    retry_mode: str = "adaptive",
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 10,
) -> Any:
    """A boto3 S3 client with retries and backoff; endpoint and region default to boto3's own
    lookup (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ~/.aws/config), credentials always do."""
    settings = tuple(os.environ.get(name) for name in S3_SETTINGS)
    return _s3_client_for(
        settings,
        endpoint_url,
        region,
        max_attempts,
        retry_mode,
        connect_timeout,
        read_timeout,
        max_pool_connections,
    )


@cache
def _s3_client_for(
    settings: tuple[str | None, ...],
    endpoint_url: str | None,
    region: str | None,
    max_attempts: int,
    retry_mode: str,
    connect_timeout: float,
    read_timeout: float,
    max_pool_connections: int,
) -> Any:
    """`settings` only keys the cache: boto3 reads the same variables itself. A session of its
    own, since boto3's default session keeps the credentials it found first."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# A conditional write that lost to another writer (412), or raced one in flight (409).
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict"}


def s3_error(uri: str, action: str, err: Exception) -> Exception:
    """The error to raise for boto3's `err` on `uri`, naming the URI (boto3's own message names
    only the API call): FileNotFoundError for a missing object or bucket, StorageAccessDenied
    for refused credentials, else StorageError. Every S3 access of the project maps its errors
    here."""
    from botocore.exceptions import ClientError

    code = ""
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
    elif isinstance(err.__cause__, ClientError):  # S3UploadFailedError wraps one
        code = str(err.__cause__.response.get("Error", {}).get("Code", ""))
    if code in _MISSING:
        what = "no such bucket" if code == "NoSuchBucket" else "not found"
        return FileNotFoundError(f"{uri}: {what} ({err})")
    if code in _DENIED:
        return StorageAccessDenied(
            f"{uri}: access denied, check the credentials (AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and the endpoint ({err})"
        )
    return StorageError(f"{action} {uri} failed: {type(err).__name__}: {err}")


def cached_object(uri: str, folder: Path) -> Path:
    """A local copy of the S3 object `uri` in `folder`, named by its ETag and size: downloaded
    when not there yet (that exact version, If-Match, streamed to a temporary name, checked for
    its size, then renamed into place), so a node's readers share one copy per version and a
    replaced object is never served from an older one. FileNotFoundError (naming `uri`) when
    there is no such object."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as err:
        raise s3_error(uri, "lookup of", err) from err
    size = int(head["ContentLength"])
    path = folder / f"{head['ETag'].strip(chr(34))}-{size}{Path(key).suffix}"
    if path.is_file() and path.stat().st_size == size:
        return path

    def download(out: Any) -> None:
        try:
            body = client.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]
            shutil.copyfileobj(body, out, 1 << 20)
        except Exception as err:
            raise s3_error(uri, "read of", err) from err
        if out.tell() != size:
            raise OSError(f"{uri}: downloaded {out.tell()} of {size} bytes")

    publish_file(path, download)
    log.info("%s -> %s", uri, path)
    return path


class S3Storage:
    """Objects under `s3://<bucket>/<prefix>/`, moved with boto3's managed transfers."""

    def __init__(self, config: StorageConfig) -> None:
        from boto3.s3.transfer import TransferConfig

        self.config = config
        self.bucket = str(config.bucket)
        self.prefix = join_key(config.prefix)
        self.client = s3_client(
            config.endpoint_url,
            config.region,
            config.max_attempts,
            config.retry_mode,
            config.connect_timeout,
            config.read_timeout,
            max_pool_connections=max(10, config.max_concurrency + 2),
        )
        chunk = config.multipart_chunk_mb * MiB
        self.transfer = TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=config.max_concurrency,
            use_threads=config.max_concurrency > 1,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.uri('')!r})"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def uri(self, key: str) -> str:
        return f"s3://{join_key(self.bucket, self._key(key))}"

    def _fail(self, key: str, action: str, err: Exception) -> Exception:
        return s3_error(self.uri(key), action, err)

    def _call(self, key: str, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as err:
            raise self._fail(key, action, err) from err

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._call(
            key,
            "upload to",
            self.client.upload_file,
            str(local_path),
            self.bucket,
            self._key(key),
            Config=self.transfer,
        )

    def download_file(self, key: str, local_path: str | Path) -> None:
        """Downloads to a temporary name, then renames: no partial file under `local_path`."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.download.tmp")
        try:
            self._call(
                key,
                "download of",
                self.client.download_file,
                self.bucket,
                self._key(key),
                str(tmp),
                Config=self.transfer,
            )
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            key,
            "upload to",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
        )

    def _get_object(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag; FileNotFoundError names the URI when it is missing."""
        response = self._call(
            key, "download of", self.client.get_object, Bucket=self.bucket, Key=self._key(key)
        )
        return self._call(key, "download of", response["Body"].read), response["ETag"]

    def get_bytes(self, key: str) -> bytes:
        return self._get_object(key)[0]

    def exists(self, key: str) -> bool:
        try:
            self._call(
                key, "lookup of", self.client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the storage root) that start with `prefix`."""
        full = join_key(self.prefix, prefix)
        if full and (prefix.endswith("/") or not prefix.strip("/")):
            full += "/"  # a folder: "run/" must not match "run2/..."
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            prefix, "listing of", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))
        )
        start = len(self.prefix) + 1 if self.prefix else 0
        return sorted(obj["Key"][start:] for page in pages for obj in page.get("Contents", []))

    def delete(self, key: str) -> None:
        self._call(
            key, "deletion of", self.client.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    def folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under folder `prefix` (S3's common prefixes)."""
        full = join_key(self.prefix, prefix) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(
            prefix,
            "listing of",
            lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")),
        )
        return sorted(
            p["Prefix"][len(full) :].rstrip("/")
            for page in pages
            for p in page.get("CommonPrefixes", [])
        )

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and its ETag, or None when absent."""
        try:
            return self._get_object(key)
        except FileNotFoundError:
            return None

    def put_if(self, key: str, data: bytes, version: str | None) -> str | None:
        """Write `data` only if the object still has ETag `version` (None: only if absent),
        with S3's conditional writes (If-Match / If-None-Match); the new ETag, or None when
        another writer changed it first.

        A refused condition is not always a lost race: when the response to a write that
        succeeded is lost, botocore sends it again and the retry finds the object changed by
        that very write. So a refusal is judged by what the object holds: exactly `data`
        means the write was ours. Lease and ledger files name their writer and the time, so
        another writer's bytes are never equal to ours."""
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **condition
            )
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _LOST_RACE or status in (409, 412):
                current = self.read_versioned(key)
                return current[1] if current is not None and current[0] == data else None
            raise self._fail(key, "conditional upload to", err) from err
        except BotoCoreError as err:
            raise self._fail(key, "conditional upload to", err) from err
        return response["ETag"]


def open_storage(config: StorageConfig) -> Storage:
    """The backend `config` describes."""
    if config.kind == "s3":
        return S3Storage(config)
    return LocalStorage(config.root)


def storage_from_uri(uri: str) -> tuple[Storage, str]:
    """(storage, key) for `s3://bucket/some/key` (endpoint from AWS_ENDPOINT_URL(_S3)) or a
    local path. The storage is rooted at the bucket, or at the local path's filesystem root, so
    `key` and keys derived from it ("<key>/manifest.json") address the same place."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return S3Storage(StorageConfig(kind="s3", bucket=bucket)), join_key(key)
    path = Path(uri).absolute()
    return LocalStorage(path.anchor), join_key(path.relative_to(path.anchor).as_posix())
