"""The checkpoint upload process: what it uploads, and what the training process hears when an
upload or the process itself fails."""

from __future__ import annotations

import socket
import threading

import pytest

from neoray.checkpoint.manifest import sha256_file
from neoray.checkpoint.upload_process import UploadProcess
from neoray.storage import StorageError


def staged_folder(tmp_path):
    folder = tmp_path / "step_00000001"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.pt").write_bytes(b"a" * 1000)
    (folder / "sub" / "b.pt").write_bytes(bytes(range(256)) * 64)
    return folder


def test_uploads_every_file_with_its_digest(storage, tmp_path):
    folder = staged_folder(tmp_path)
    uploader = UploadProcess(storage.config)
    try:
        entries = uploader.upload(folder, "run/checkpoints/step_00000001")
    finally:
        uploader.close()
    assert [(e.path, e.size) for e in entries] == [("a.pt", 1000), ("sub/b.pt", 256 * 64)]
    for entry in entries:
        assert entry.sha256 == sha256_file(folder / entry.path)
        key = f"run/checkpoints/step_00000001/{entry.path}"
        assert storage.get_bytes(key) == (folder / entry.path).read_bytes()


def test_a_failed_upload_is_reported_and_a_dead_process_replaced(tmp_path):
    from neoray.storage import LocalStorage

    storage = LocalStorage(tmp_path / "store")
    folder = staged_folder(tmp_path)
    uploader = UploadProcess(storage.config)
    try:
        (tmp_path / "store").mkdir()
        (tmp_path / "store" / "run").write_text("a file where a folder goes")
        with pytest.raises(StorageError, match="Error"):
            uploader.upload(folder, "run/checkpoints/step_00000001")
        first = uploader.process
        first.kill()
        first.wait()
        assert len(uploader.upload(folder, "other/step_00000001")) == 2
        assert uploader.process is not first
    finally:
        uploader.close()


def test_a_process_that_dies_during_an_upload_fails_that_upload(tmp_path, monkeypatch):
    """The child is killed while it waits on an S3 endpoint that never answers: the training
    process hears of it at once (not after the request's timeout)."""
    from neoray.storage import StorageConfig

    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(name, value)
    silent = socket.create_server(("127.0.0.1", 0))
    config = StorageConfig(
        kind="s3",
        bucket="b",
        endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
        max_attempts=1,
    )
    uploader = UploadProcess(config)
    outcome: list[BaseException] = []

    def upload() -> None:
        try:
            uploader.upload(staged_folder(tmp_path), "run/step_00000001")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=upload)
    thread.start()
    connection, _ = silent.accept()  # the child is sending its first file
    uploader.process.kill()
    thread.join(timeout=30)
    connection.close()
    silent.close()
    assert not thread.is_alive()
    assert isinstance(outcome[0], StorageError) and "upload process ended" in str(outcome[0])
