"""Prometheus metrics served on BentoML's `/metrics`.

Plain prometheus_client (BentoML 1.4 deprecates `bentoml.metrics`): BentoML starts workers with
PROMETHEUS_MULTIPROC_DIR set, so these write to its multiprocess directory and `/metrics` aggregates
them over workers (counters and histograms summed, the version gauge as max over live workers).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_BUCKETS = tuple(float(2 ** k) for k in range(13))  # 1 .. 4096

agent_rows = Counter(
    name="lorasa_agent_rows", documentation="Rows acted on, per agent",
    labelnames=["agent_id"])
act_requests = Counter(
    name="lorasa_act_requests", documentation="Act requests (/v1/act, /v2 infer) by outcome (ok, client_error, error)",
    labelnames=["outcome"])
batch_rows = Histogram(
    name="lorasa_batch_rows", documentation="Rows per engine forward (requests merged by the batcher)",
    buckets=BATCH_BUCKETS)
batch_requests = Histogram(
    name="lorasa_batch_requests", documentation="HTTP requests merged into one engine forward",
    buckets=BATCH_BUCKETS)
inline_requests = Counter(
    name="lorasa_inline_requests", documentation="Act requests served by a cycle on the event loop (the fast path for small stateless requests)")
adapter_version = Gauge(
    name="lorasa_adapter_version", documentation="Adapter version served, per agent (max over live workers)",
    labelnames=["agent_id"], multiprocess_mode="livemax")
adapter_swaps = Counter(
    name="lorasa_adapter_swaps", documentation="Adapter versions applied by a worker, per agent",
    labelnames=["agent_id"])
adapter_load_failures = Counter(
    name="lorasa_adapter_load_failures", documentation="Published adapter versions a worker failed to "
    "load (it keeps serving its previous version; retried with back-off), per agent",
    labelnames=["agent_id"])
state_check_seconds = Histogram(
    name="lorasa_state_check_seconds",
    documentation="Time of the once-per-batch read of the state generation (the version check)",
    buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))
state_unavailable = Counter(
    name="lorasa_state_unavailable", documentation="Calls that found the state backend unreachable, by use",
    labelnames=["op"])
