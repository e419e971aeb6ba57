"""Every job starts or joins Ray through one function; a Ray it starts serves its dashboard (the
Jobs API) on loopback only."""

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


def test_a_local_ray_serves_its_dashboard_on_127_0_0_1_only():
    code = (
        "import ray\n"
        "from neoray.cluster.ray_start import start_or_join\n"
        "assert start_or_join(num_cpus=1, dashboard=True)\n"
        "assert not start_or_join()  # connected already: nothing new\n"
        "import psutil\n"  # the dashboard's HTTP server: where its --port says
        "[web] = [p for p in psutil.Process().children(recursive=True)\n"
        "    if any(a.endswith('dashboard/dashboard.py') for a in p.cmdline())]\n"
        "port = int(next(a for a in web.cmdline() if a.startswith('--port='))[7:])\n"
        "import time\n"  # on a loaded machine the server may not listen yet: wait for it
        "for _ in range(300):\n"
        "    ips = {c.laddr.ip for c in web.net_connections('inet')\n"
        "           if c.status == 'LISTEN' and c.laddr.port == port}\n"
        "    if ips: break\n"
        "    time.sleep(0.1)\n"
        "print(','.join(sorted(ips)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listening = result.stdout.split()[-1]
    assert listening == "127.0.0.1"  # the dashboard (the Jobs API) on loopback only


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
