"""Joining a Ray cluster (the optional `ray` extra) for `lorasa-report run --ray` and `lorasa-train --env.backend
ray`. The driver ships its own `training` and `lorasa_serve` packages to every node (Ray `runtime_env`
`py_modules`), so workers run exactly the driver's code; each node needs the same Python packages installed
(torch, the env's simulator, ray).

    ray = connect("auto")        # or "host:port" (a cluster started with `ray start`), "local" (a private one)
"""
from __future__ import annotations

import os
from pathlib import Path

from lorasa_serve.cli import UsageError

EXTRA_HINT = "pip install 'lorasa-serve[ray]'"


def require_ray():
    """The `ray` module, or a UsageError (one line) naming the extra."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"Ray is not installed: the Ray backends need the 'ray' extra ({EXTRA_HINT})") from None
    return ray


def package_dirs() -> list[str]:
    """The directories of the packages Ray workers import (shipped to every node)."""
    import lorasa_serve
    import training
    return [str(Path(m.__file__).parent) for m in (training, lorasa_serve)]


def connect(address: str, local_cpus: int | None = None):
    """Join the cluster at `address` ("auto", "host:port", or "local": start a private one-machine Ray with
    `local_cpus` CPUs, default this machine's) once per process -> the `ray` module. UsageError (one line)
    if there is no cluster there."""
    loopback = address == "local" or address.split(":")[0] in ("127.0.0.1", "localhost")
    if loopback:  # Ray would swap 127.0.0.1 for this machine's network address; keep it on the loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if loopback:
        import ray._private.ray_constants as ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False  # (read at call time; set before ray was imported, too)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {"py_modules": package_dirs(), "env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    try:
        # a private local Ray binds to loopback only (never the machine's network address), no dashboard
        local = {"_node_ip_address": "127.0.0.1", "include_dashboard": False} if address == "local" else {}
        if address == "local" and local_cpus:
            local["num_cpus"] = local_cpus
        ray.init(address=None if address == "local" else address, runtime_env=env, log_to_driver=False, **local,
                 logging_level="WARNING", configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0] if str(e) else e}); "
                         "start one with `ray start --head` (then pass auto or its host:port), or pass "
                         "local") from None
    return ray
