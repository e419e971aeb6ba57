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


def recorded_stack(state_dir: Path, processes: dict[str, subprocess.Popen]) -> stack.Stack:
    """A stack.json in `state_dir` naming `processes` as its services, as `up` records them."""
    record = stack.Stack(
        state_dir=str(state_dir),
        ray_address="127.0.0.1:1",
        ray_dashboard="http://127.0.0.1:2",
        ray_temp_dir=str(state_dir / "ray"),
        token_path=str(state_dir / "auth_token"),
        mlflow_url="http://127.0.0.1:3",
        s3_endpoint="http://127.0.0.1:4",
        bucket="neoray",
        pids={},
        weed_ports={},
    )
    for name, process in processes.items():
        record.record(name, process.pid)
    return record


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_a_stack_running_in_part_is_not_reported_as_up(tmp_path):
    alive, dead = sleeper(), subprocess.Popen(["sleep", "0.2"], start_new_session=True)
    try:
        recorded_stack(tmp_path, {"s3": alive, "mlflow": dead})
        dead.wait()
        with pytest.raises(ServiceError, match=r"runs only in part \(mlflow stopped\)"):
            stack.up(tmp_path)
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("stale", ["another process", "another boot"])
def test_down_never_signals_a_process_the_stack_did_not_start(tmp_path, stale, capsys):
    """After a reboot, or once a service has ended, its recorded id may be any process's: a
    stale stack.json names such a process, which `down` leaves alone."""
    unrelated = sleeper()
    try:
        record = recorded_stack(tmp_path, {"mlflow": unrelated})
        if stale == "another process":  # the id now belongs to a process started later
            record.started["mlflow"] += 3600
        else:
            record.boot_time -= 3600
        (tmp_path / "stack.json").write_text(json.dumps(record.__dict__))
        assert stack.running_stack(tmp_path) is None
        assert stack.down(tmp_path)
        assert unrelated.poll() is None, "down signalled a process that is not the stack's"
        assert f"not stopping process group {unrelated.pid}" in capsys.readouterr().out
        assert not (tmp_path / "stack.json").exists()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_down_stops_the_services_it_started(tmp_path):
    service = sleeper()
    recorded_stack(tmp_path, {"mlflow": service})
    assert stack.running_stack(tmp_path) is not None
    assert stack.down(tmp_path)
    assert service.wait(timeout=10) is not None
