"""Merged single-agent policies: W0 + (alpha/r) B A on every adapted layer, no adapters.

The result is a plain version-1 policy directory (policy.json + backbone.safetensors) with one agent
at its true sizes: the head and log_std are sliced to its act_dim (head rows are independent, so
this is exact). The input stays padded to the team's obs_max (`obs_width` in policy.json) because
ln_in normalises over the padded width; a non-Python user zero-pads obs to `obs_width` columns.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import Tensor

from lorasa_serve import Engine, save_policy
from lorasa_serve.spec import PolicySpec


def merged_policy(engine: Engine, agent_id: str) -> tuple[PolicySpec, dict[str, Tensor]]:
    """-> (single-agent spec, backbone tensors [out, in]) for `agent_id` with its adapter merged."""
    spec = engine.spec
    agent = spec.agent(agent_id)
    tensors = {k: v.detach().cpu().clone() for k, v in engine.backbone().items()}
    for name, w in engine.merged_weights(agent_id).items():
        tensors[f"{name}.weight"] = w.detach().cpu().clone()
    tensors["head.weight"] = tensors["head.weight"][:agent.act_dim].contiguous()
    tensors["head.bias"] = tensors["head.bias"][:agent.act_dim].contiguous()
    if spec.action == "gaussian":
        tensors["log_std"] = tensors["log_std"][:agent.act_dim].contiguous()
    width = spec.obs_max if agent.obs_dim < spec.obs_max else None
    one = replace(spec, agents=(agent,), obs_width=width, backbone_fingerprint="")
    return one, tensors


def write_merged(engine: Engine, agent_id: str, directory: Path) -> PolicySpec:
    """Write the merged policy directory (callers pass a temporary directory, then rename it)."""
    spec, tensors = merged_policy(engine, agent_id)
    return save_policy(directory, spec, tensors)
