"""Prometheus metrics added to BentoML's `/metrics` (multiprocess mode: summed over workers)."""
from __future__ import annotations

import bentoml

BATCH_BUCKETS = tuple(float(2 ** k) for k in range(13))  # 1 .. 4096

agent_rows = bentoml.metrics.Counter(
    name="lorasa_agent_rows", documentation="Rows acted on, per agent",
    labelnames=["agent_id"])
act_requests = bentoml.metrics.Counter(
    name="lorasa_act_requests", documentation="/v1/act requests by outcome (ok, client_error, error)",
    labelnames=["outcome"])
batch_rows = bentoml.metrics.Histogram(
    name="lorasa_batch_rows", documentation="Rows per engine forward (requests merged by the batcher)",
    buckets=BATCH_BUCKETS)
batch_requests = bentoml.metrics.Histogram(
    name="lorasa_batch_requests", documentation="HTTP requests merged into one engine forward",
    buckets=BATCH_BUCKETS)
adapter_version = bentoml.metrics.Gauge(
    name="lorasa_adapter_version", documentation="Adapter version served, per agent (max over live workers)",
    labelnames=["agent_id"], multiprocess_mode="livemax")
adapter_swaps = bentoml.metrics.Counter(
    name="lorasa_adapter_swaps", documentation="Adapter versions applied by a worker, per agent",
    labelnames=["agent_id"])
