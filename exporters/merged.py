"""Merged single-agent policies: W0 + (alpha/r) B A on every adapted layer, no adapters.

The result is a plain version-1 policy directory (policy.json + backbone.safetensors) with one agent
at its true sizes: the head and log_std are sliced to its act_dim (head rows are independent, so
this is exact); the log_std is the agent's own (the backbone's plus its adapter's `log_std_offset`). The input stays padded to the team's obs_max (`obs_width` in policy.json) because
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
        # the agent's own log-std (backbone log_std + its adapter's log_std_offset, if any)
        tensors["log_std"] = engine.log_std(agent_id).detach().cpu()[:agent.act_dim].clone().contiguous()
    width = spec.obs_max if agent.obs_dim < spec.obs_max else None
    if spec.agent_onehot:  # the merged agent keeps its column of the team's one-hot
        agent = replace(agent, onehot_index=spec.onehot_index(spec.agent_ids.index(agent_id)))
    one = replace(spec, agents=(agent,), obs_width=width, backbone_fingerprint="",
                  lora=replace(spec.lora, log_std_offset=False))  # merged: no adapters, no offsets
    return one, tensors


def write_merged(engine: Engine, agent_id: str, directory: Path) -> PolicySpec:
    """Write the merged policy directory (callers pass a temporary directory, then rename it)."""
    spec, tensors = merged_policy(engine, agent_id)
    return save_policy(directory, spec, tensors)
