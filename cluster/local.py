"""Starting (or joining) Ray the way triserve needs it: on loopback when local, no dashboard."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

STARTUP_ATTEMPTS = 5  # a loaded machine can keep a local raylet from registering within Ray's 30 s
T = TypeVar("T")


def start_with_retries(start: Callable[[], T], undo: Callable[[], None]) -> T:
    """``start()``, which starts local Ray processes; when it fails because a raylet missed Ray's fixed
    30 s to register (Ray raises a bare Exception), ``undo()`` and start again, ``STARTUP_ATTEMPTS``
    times in all. Any other failure is raised at once."""
    attempt = 1
    while True:
        try:
            return start()
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == STARTUP_ATTEMPTS:
                raise
            print(f"Ray did not start within its 30 s on a busy machine; trying again ({attempt}/{STARTUP_ATTEMPTS})")
            undo()
            attempt += 1


def wait_until_healthy(base: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait for a served app's ``/health`` to answer 200 (Serve's proxy answers 404 until the routes
    register, and nothing while it starts)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not up yet, 404 or 503
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"the app at {base} did not answer /health within {timeout_s:.0f} s")


def ensure_ray(
    num_cpus: float | None = None, address: str | None = None, worker_niceness: int | None = None, **kwargs
) -> None:
    """Join ``address``/``RAY_ADDRESS`` when given, else start a local Ray bound to 127.0.0.1.

    ``worker_niceness``: the niceness a local Ray gives its worker processes (and what they start,
    such as engine processes) unless ``RAY_worker_niceness`` is set; None keeps Ray's default of 15,
    under which any busy process at the usual 0 (Ray's own, a client on the same machine) takes the
    CPU from the workers. A joined cluster's nodes set it themselves (cluster/*.yaml).
    """
    # also set when the cluster package is imported: it must precede Ray's own import
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    if worker_niceness is not None:  # read by the raylet this starts
        os.environ.setdefault("RAY_worker_niceness", str(worker_niceness))
    start_with_retries(
        lambda: ray.init(
            address="local",  # without it Ray joins the newest cluster on this machine (any other process's)
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            **kwargs,
        ),
        ray.shutdown,
    )
