"""Per-server process settings applied by the `bentoml serve` parent before it starts workers.

- Metrics dir: BentoML 1.4 puts every server's prometheus multiprocess files in
  `$BENTOML_HOME/prometheus_multiproc_dir` and empties it at start (bentoml.serving.ensure_prometheus_dir),
  so a second server on the host wiped the first one's `/metrics`. `bentoml serve` imports the service
  module before calling that function, so the parent points it at this server's own directory
  (LORASA_METRICS_DIR, default a fresh temp dir removed at exit); workers inherit it through
  PROMETHEUS_MULTIPROC_DIR.
- Worker replacement: BentoML's arbiter (circus) looks for dead workers every `check_delay` s, 10 by
  default (bentoml._internal.utils.circus.create_standalone_arbiter); a killed worker is replaced after
  that plus its start-up time. The parent lowers it to LORASA_ARBITER_CHECK_S (default 1 s).
Workers (PROMETHEUS_MULTIPROC_DIR already set) change nothing.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile

log = logging.getLogger("lorasa.service")


def configure_server(metrics_dir: str, arbiter_check_s: float) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # a worker, or a user-chosen shared dir
        return
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.utils import circus

    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="lorasa-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(metrics_dir)
    original = getattr(circus.create_standalone_arbiter, "__wrapped__", circus.create_standalone_arbiter)

    @functools.wraps(original)
    def create_standalone_arbiter(watchers, **kwargs):
        kwargs.setdefault("check_delay", arbiter_check_s)
        return original(watchers, **kwargs)

    circus.create_standalone_arbiter = create_standalone_arbiter
