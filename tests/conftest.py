"""Shared fixtures: tiny policies built in Python (no downloads, a few KB each)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lorasa_serve import AgentSpec, LoraSpec, PolicySpec, init_adapter, init_backbone, save_policy  # noqa: E402


def make_policy(directory, *, obs=(6, 6, 6), act=(2, 2, 2), recurrent=True, action="gaussian",
                hidden=16, rank=4, alpha=8.0, layers=None, seed=0, b_std=0.2, adapters=True):
    """Write a tiny random policy with adapters that really differ; returns (spec, backbone, adapters)."""
    agents = tuple(AgentSpec(f"agent_{i}", o, a) for i, (o, a) in enumerate(zip(obs, act)))
    spec = PolicySpec(agents=agents, hidden=hidden, recurrent=recurrent, action=action,
                      lora=LoraSpec(rank=rank, alpha=alpha, layers=layers))
    g = torch.Generator().manual_seed(seed)
    backbone = init_backbone(spec, g, head_gain=1.0)
    if action == "gaussian":
        backbone["log_std"] = torch.linspace(-1.0, 0.0, spec.act_max)
    ads = {a: init_adapter(spec, g, b_std=b_std) for a in spec.agent_ids} if adapters else {}
    spec = save_policy(directory, spec, backbone, ads)
    return spec, backbone, ads


@pytest.fixture
def tiny_policy(tmp_path):
    d = tmp_path / "policy"
    spec, backbone, ads = make_policy(d)
    return d, spec, backbone, ads


@pytest.fixture
def hetero_policy(tmp_path):
    """MaMuJoCo Humanoid 9|8-like sizes: obs 242 / 170, act 9 / 8."""
    d = tmp_path / "hetero"
    spec, backbone, ads = make_policy(d, obs=(242, 170), act=(9, 8), hidden=32)
    return d, spec, backbone, ads


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port (module-scoped: tests use distinct key prefixes or
    flush it); `.restart()` brings it back empty, `.stop()`/`.start()` simulate an outage."""
    from services.redis_server import RedisServer
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
