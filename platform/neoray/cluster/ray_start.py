"""How every job starts or joins Ray: one function, so every job gets the same settings.

A Ray this process starts is a single-machine Ray, as the `neoray up` stack's head is: every
server (dashboard and Jobs API, GCS, raylet, agents, workers) listens on 127.0.0.1 only, so no
other machine can reach it or join it. Ray's token authentication (on by default) guards it
against the machine's other users: the token file is this user's alone (0600), whether Ray
would create it or one exists already.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neoray.environment import temporary_environment

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
# Ray's single-machine mode: a node address of 127.0.0.1 stays loopback (instead of being
# resolved to the machine's reachable address) and Ray's servers then bind to it alone.
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class TokenFileError(PermissionError):
    """A Ray token file that another user owns, or that is not a plain file."""


def token_file() -> Path | None:
    """The file Ray reads its authentication token from in this environment (RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token); None when the token is in RAY_AUTH_TOKEN or authentication is off."""
    if (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token"
    ):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def private_token(create: bool = False) -> None:
    """Make sure the token file Ray will use (`token_file`) is this user's alone: one that
    others can read is made 0600, with a message; another user's is refused. With `create`
    (a local Ray is about to start) a missing one is made here, 0600 from its creation, rather
    than by Ray, which writes it with the default permissions (0644)."""
    path = token_file()
    if path is None:
        return
    if create and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass  # another job made it meanwhile: checked below like any existing one
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))  # as Ray's own generator
            return
    try:
        info = path.stat()
    except FileNotFoundError:
        return  # joining a cluster with no token here: Ray says what is missing
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise TokenFileError(
            f"Ray's token file {path} is not a file of this user (uid {os.geteuid()}; it is "
            f"uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): whoever owns it knows the "
            "token. Remove it (a new one is made when a job starts its own Ray) or point "
            "RAY_AUTH_TOKEN_PATH at a token file of yours"
        )
    if info.st_mode & 0o077:
        path.chmod(0o600)
        print(
            f"Ray's token file {path} was readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); made it 0600. If another user could have read "
            "it, delete it while no Ray of yours runs: the next local Ray makes a new one",
            file=sys.stderr,
            flush=True,
        )


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for a Ray started inside the block: its processes get
    LOOPBACK_VARIABLE=0 from the environment; this process read it when it imported Ray (maybe
    before the block), so its copy of the setting is switched too, for the start only."""
    from ray._private import ray_constants

    enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with temporary_environment(**{LOOPBACK_VARIABLE: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled


def start_or_join(
    address: str | None = None,
    num_cpus: int | None = None,
    use_gpu: bool = True,
    dashboard: bool = False,
    log_to_driver: bool = True,
) -> bool:
    """Join `address` (else RAY_ADDRESS), or start a local Ray listening on 127.0.0.1 only.
    Nothing happens when this process is connected already. True when a local Ray was started
    here (the caller may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    private_token(create=not address)
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    # Ray's own workers that look their cluster up (Ray Train's placement-group cleaner, through
    # the State API) find it by RAY_ADDRESS, else by scanning the machine for GCS processes, which
    # fails when another Ray runs there (a `neoray up` stack, another user's job): the cleaner
    # then dies and a stopped trial's resources are never freed. So the GCS port is chosen here
    # and every worker of this job is told the address.
    from neoray.cluster.services import free_ports

    (port,) = free_ports(1)
    # The port is read by the GCS that ray.init starts.
    with _loopback_only(), temporary_environment(**{GCS_PORT_VARIABLE: str(port)}):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=None if use_gpu else 0,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
        )
    return True
