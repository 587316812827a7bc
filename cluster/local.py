"""Starting (or joining) Ray the way triserve needs it: on loopback when local, no dashboard."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: float | None = None, address: str | None = None, **kwargs) -> None:
    """Join ``address``/``RAY_ADDRESS`` when given, else start a local Ray bound to 127.0.0.1."""
    # also set when the cluster package is imported: it must precede Ray's own import
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        **kwargs,
    )
