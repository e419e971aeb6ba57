"""How every job starts or joins Ray: one function, so every job gets the same settings.

A Ray this process starts serves its dashboard (the Jobs API) on 127.0.0.1 only. Ray itself
resolves a loopback node address to the machine's reachable one and its gRPC servers (GCS,
raylet, agents) listen on every interface, protected by Ray's token authentication (on by
default): on a shared network, firewall the Ray ports.
"""

from __future__ import annotations

import os

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


def start_or_join(
    address: str | None = None,
    num_cpus: int | None = None,
    use_gpu: bool = True,
    dashboard: bool = False,
    log_to_driver: bool = True,
) -> bool:
    """Join `address` (else RAY_ADDRESS), or start a local Ray with its dashboard on
    127.0.0.1. Nothing happens when this process is connected already. True when a local Ray
    was started here (the caller may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
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
    previous = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(port)  # read by the GCS that ray.init starts, then restored
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=None if use_gpu else 0,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
        )
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = previous
    return True
