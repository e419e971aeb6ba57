"""The local stack's state is this user's alone: folders 0700, secrets 0600 from their creation,
a predictable folder someone else made is refused, and a stack running in part is not taken
for a running one. Nothing here starts a service."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from neoray.cluster import stack
from neoray.cluster.services import ServiceError

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def ray_temp_of(state_dir: Path) -> Path:
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(f"/tmp/neoray-{os.getuid()}-{digest}")


def test_secrets_are_private_from_creation_even_with_an_open_umask(tmp_path):
    previous = os.umask(0)
    try:
        secret = stack._secret(tmp_path / "token", "s3cr3t")
    finally:
        os.umask(previous)
    assert secret == "s3cr3t" and mode(tmp_path / "token") == 0o600
    assert stack._secret(tmp_path / "token", "other") == "s3cr3t"  # made once, then kept


def test_a_secret_others_can_read_is_refused(tmp_path):
    (tmp_path / "token").write_text("s3cr3t")
    (tmp_path / "token").chmod(0o644)
    with pytest.raises(ServiceError, match=r"token must be a file of this user .* mode 644"):
        stack._secret(tmp_path / "token", "new")


def test_state_folders_are_made_private(tmp_path):
    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    stack._private_dir(loose)
    stack._private_dir(tmp_path / "new" / "logs")
    assert mode(loose) == 0o700 and mode(tmp_path / "new" / "logs") == 0o700


def test_a_symlink_planted_at_the_ray_folder_is_refused(tmp_path):
    state_dir = tmp_path / "state"
    planted = ray_temp_of(state_dir)
    (tmp_path / "elsewhere").mkdir()
    planted.symlink_to(tmp_path / "elsewhere")
    try:
        with pytest.raises(ServiceError, match=r"is not a directory of this user .*a symlink"):
            stack.up(state_dir)
    finally:
        planted.unlink()
    assert not (state_dir / "stack.json").exists()  # nothing was started


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder of another user needs root")
def test_a_ray_folder_another_user_made_first_is_refused(tmp_path):
    state_dir = tmp_path / "state"
    planted = ray_temp_of(state_dir)
    planted.mkdir(mode=0o777)
    os.chown(planted, NOBODY, NOBODY)
    try:
        with pytest.raises(ServiceError, match=rf"{planted} is not a directory of this user"):
            stack.up(state_dir)
    finally:
        shutil.rmtree(planted)
    assert not (state_dir / "stack.json").exists()  # nothing was started


def test_a_stack_running_in_part_is_not_reported_as_up(tmp_path):
    alive = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dead = subprocess.Popen(["true"], start_new_session=True)
    dead.wait()
    try:
        record = stack.Stack(
            state_dir=str(tmp_path),
            ray_address="127.0.0.1:1",
            ray_dashboard="http://127.0.0.1:2",
            ray_temp_dir=str(tmp_path / "ray"),
            token_path=str(tmp_path / "auth_token"),
            mlflow_url="http://127.0.0.1:3",
            s3_endpoint="http://127.0.0.1:4",
            bucket="neoray",
            pids={"s3": alive.pid, "mlflow": dead.pid},
            weed_ports={},
        )
        (tmp_path / "stack.json").write_text(json.dumps(record.__dict__))
        with pytest.raises(ServiceError, match=r"runs only in part \(mlflow stopped\)"):
            stack.up(tmp_path)
    finally:
        alive.kill()
        alive.wait()
