"""Benchmark-only probe: the same Engine behind BentoML's own adaptive batching, to measure it
against the service's micro-batcher (`python -m benchmarks.load_bench --compare-bentoml-batching`).

    LORASA_POLICY=... bentoml serve benchmarks.bentoml_batching_probe:BatchableProbe

BentoML batching merges the one list argument of concurrent requests and splits the returned list
back, so only stateless, deterministic rows fit (no sessions, no per-request options, no versions),
and one bad row fails every request merged with it. Not a product API: the service is
services/service.py.
"""
from __future__ import annotations

import bentoml
import numpy as np
import torch
from pydantic import BaseModel

from lorasa_serve import Engine

from services.config import ServiceConfig

CONFIG = ServiceConfig.from_env()


class Row(BaseModel):
    agent_id: str
    obs: list[float]
    state: list[float] | None = None


@bentoml.service(name="lorasa_batching_probe", workers=1, traffic={"timeout": CONFIG.timeout_s})
class BatchableProbe:
    def __init__(self) -> None:
        torch.set_num_threads(CONFIG.torch_threads)
        self.engine = Engine.from_dir(CONFIG.policy, device=CONFIG.device, mode=CONFIG.mode)
        self.dims = {a.agent_id: a.act_dim for a in self.engine.spec.agents}

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=CONFIG.max_batch_rows, max_latency_ms=1000)
    def act(self, rows: list[Row]) -> list[dict]:
        spec = self.engine.spec
        obs = np.zeros((len(rows), spec.obs_max), dtype=np.float32)  # [B, obs_max]
        state = np.zeros((len(rows), spec.hidden), dtype=np.float32)  # [B, H]
        for i, r in enumerate(rows):
            obs[i, :len(r.obs)] = r.obs
            if r.state is not None:
                state[i] = r.state
        out = self.engine.act([r.agent_id for r in rows], torch.from_numpy(obs), torch.from_numpy(state))
        acts, logp, h = out.actions.numpy(), out.log_probs.tolist(), out.state.numpy()
        return [{"action": acts[i, :self.dims[r.agent_id]].tolist(), "log_prob": logp[i],
                 "state": h[i].tolist()} for i, r in enumerate(rows)]
