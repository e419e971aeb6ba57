"""An MLflow address that refuses the job for good (wrong password: 401, wrong URL: 404) is
named before training starts; one that is merely down is not; a refusal during the run is
printed when it happens. The refusing servers are real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
import time
from collections.abc import Iterator

import pytest
from services import free_ports
from test_pretrain_job import compose_pretrain

from neoray.config import ConfigError
from neoray.tracking import MLflowTracker, TrackingConfig, check_access
from neoray.tracking_queue import QueuedTracker
from neoray.training.job import run_pretrain


class Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request with `status` and a plain-text body, as a proxy in front of
    MLflow does for a wrong password (401) or a path it does not serve (404)."""

    status = 401

    def _refuse(self) -> None:
        body = f"refused with {self.status}".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def answering(status: int) -> Iterator[str]:
    """The URL of a server answering every request with HTTP `status`."""
    handler = type("Handler", (Refusing,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def refusing(request) -> Iterator[str]:
    with answering(request.param) as url:
        yield url


@pytest.mark.parametrize(
    "refusing, password, reason",
    [
        (401, "admin:S3cret@", r"\(HTTP 401, UNAUTHENTICATED\): the credentials are wrong"),
        (404, "", r"\(HTTP 404, ENDPOINT_NOT_FOUND\): no MLflow tracking API answers"),
    ],
    indirect=["refusing"],
)
def test_a_refusing_mlflow_stops_the_job_before_training(refusing, password, reason, tmp_path):
    url = refusing.replace("http://", f"http://{password}")
    shown = re.escape(refusing.replace("http://", "http://admin:***@" if password else "http://"))
    cfg = compose_pretrain(
        "launcher=torchrun",
        "tracking=server",
        f"tracking.uri='{url}'",
        "checkpoint.enabled=false",
        f"run_dir={tmp_path / 'run'}",
    )
    with pytest.raises(
        ConfigError, match=rf"tracking\.uri={shown}: MLflow refuses this run {reason}"
    ) as raised:
        run_pretrain(cfg)
    assert "S3cret" not in str(raised.value)
    assert not (tmp_path / "run").exists(), "nothing of the run is started"


@pytest.mark.parametrize("status", [None, 503])  # None: nothing listens
def test_mlflow_being_down_does_not_stop_the_job(status):
    (port,) = free_ports(1)
    with answering(status) if status else contextlib.nullcontext(f"http://127.0.0.1:{port}") as url:
        started = time.monotonic()
        check_access(TrackingConfig(uri=url))
        assert time.monotonic() - started < 30, "the check does not wait out MLflow's retries"


@pytest.mark.parametrize("refusing", [401], indirect=True)
def test_a_refusal_during_the_run_is_printed_when_it_happens(refusing, capfd):
    config = TrackingConfig(uri=refusing, experiment="tests", system_metrics=False)
    tracker = QueuedTracker(
        functools.partial(MLflowTracker, config, "refused", {}),
        uri=refusing,
        buffer_rows=10,
        flush_timeout_s=30,
        pause_s=0.1,
    )
    tracker.on_start(None, [])
    tracker.on_metrics({"step": 0, "loss": 1.0})
    printed, deadline = "", time.monotonic() + 30
    while "refused a request" not in printed:  # before the run ends, not at its end
        assert time.monotonic() < deadline, printed
        time.sleep(0.1)
        printed += capfd.readouterr().out
    assert f"MLflow at {refusing} refused a request" in printed
    assert "401" in printed and "nothing more of this run is logged to MLflow" in printed
    tracker.close()
