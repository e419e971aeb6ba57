"""Every job starts or joins Ray through one function; a Ray it starts listens on loopback only,
its token file private to the user."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_job_starts_ray_any_other_way():
    calls = [
        path.relative_to(ROOT).as_posix()
        for folder in ("platform", "jobs")
        for path in (ROOT / folder).rglob("*.py")
        if "ray.init(" in path.read_text()
    ]
    assert calls == ["platform/neoray/cluster/ray_start.py"]


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_a_local_ray_listens_on_127_0_0_1_only_with_a_private_token(tmp_path):
    """Every server of a Ray a job starts (dashboard and Jobs API, GCS, raylet, agents, the
    driver's and a worker's gRPC servers) listens on loopback, and the token file is 0600."""
    code = (
        "import ray\n"
        "from neoray.cluster.ray_start import start_or_join\n"
        "assert start_or_join(num_cpus=1, dashboard=True)\n"
        "assert not start_or_join()  # connected already: nothing new\n"
        "ray.get(ray.remote(lambda: 1).remote())  # a worker\n"
        "import psutil, time\n"
        "ray_processes = lambda: [psutil.Process(), *psutil.Process().children(recursive=True)]\n"
        "[web] = [p for p in ray_processes()\n"
        "    if any(a.endswith('dashboard/dashboard.py') for a in p.cmdline())]\n"
        "port = int(next(a for a in web.cmdline() if a.startswith('--port='))[7:])\n"
        "for _ in range(300):\n"  # on a loaded machine the dashboard may not listen yet
        "    listening = set()\n"
        "    for p in ray_processes():\n"
        "        try:\n"
        "            listening |= {(p.name(), c.laddr.ip, c.laddr.port)\n"
        "                for c in p.net_connections('inet') if c.status == 'LISTEN'}\n"
        "        except psutil.NoSuchProcess:\n"
        "            pass\n"
        "    if any(port == p for _, _, p in listening): break\n"
        "    time.sleep(0.1)\n"
        "for name, ip, port in sorted(listening): print('LISTEN', name, ip, port)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no token yet: the start makes one
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listening = [
        line.split()[1:] for line in result.stdout.splitlines() if line.startswith("LISTEN")
    ]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names)
    assert all(ip in LOOPBACK for _, ip, _ in listening), listening
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64


def test_a_token_file_others_can_read_is_made_private_and_another_users_refused(
    tmp_path, monkeypatch, capfd
):
    import pytest

    from neoray.cluster.ray_start import TokenFileError, private_token

    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    private_token()  # joining: nothing to make
    assert not (tmp_path / ".ray").exists()
    private_token(create=True)
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / ".ray").stat().st_mode & 0o777 == 0o700
    token.chmod(0o644)  # as Ray writes it
    private_token()
    assert token.stat().st_mode & 0o777 == 0o600
    assert "was readable by others (mode 644); made it 0600" in capfd.readouterr().err
    theirs = tmp_path / "theirs"
    theirs.write_text("x")
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(theirs))
    with pytest.raises(TokenFileError, match="is not a file of this user"):
        private_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    private_token()  # no token in use


def test_workers_find_their_own_ray_while_another_runs_on_the_machine(tmp_path):
    """Ray's own workers look their cluster up (Ray Train's placement-group cleaner, through the
    State API); with a second Ray on the machine (a `neoray up` stack) a scan for GCS processes
    fails, the cleaner dies, and a stopped sweep trial's resources are never freed."""
    from ray._private.services import find_gcs_addresses

    from neoray.cluster.services import ray_head_command, ray_ports, start, stop_group

    ports = ray_ports()
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    other = start(ray_head_command(temp, ports, 1), tmp_path / "other.log")
    try:
        deadline = time.monotonic() + 120
        while not any(a.endswith(f":{ports['gcs']}") for a in find_gcs_addresses()):
            assert other.poll() is None and time.monotonic() < deadline, (
                "the other Ray did not start"
            )
            time.sleep(0.5)
            find_gcs_addresses.cache_clear()  # Ray caches what it found, once it found any
        code = (
            "import ray\n"
            "from neoray.cluster.ray_start import start_or_join\n"
            "assert start_or_join(num_cpus=1, dashboard=True)\n"
            "from ray.dashboard.utils import get_address_for_submission_client as api\n"
            "@ray.remote(num_cpus=0)\n"
            "def lookup():\n"  # what the State API client does with no address given
            "    return api(None)\n"
            "print(ray.get(lookup.remote()))\n"
            "print(api(ray.get_runtime_context().gcs_address))\n"  # ours
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        found, ours = result.stdout.split()[-2:]
        assert found == ours
    finally:
        stop_group(other.pid)
        shutil.rmtree(temp, ignore_errors=True)
