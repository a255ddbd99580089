"""The slow, obviously-correct oracle: one row at a time, agent's weights merged by hand.

Written without lorasa_serve.network so that a bug there cannot hide in both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lorasa_serve.spec import PolicySpec


def merged_linears(spec: PolicySpec, backbone: dict, adapter: dict | None) -> dict:
    """name -> (W [out, in], b [out]) with W = W0 + (alpha / r) * B @ A on adapted layers."""
    out = {}
    for name in spec.linear_names():
        w = backbone[f"{name}.weight"].double()
        if adapter is not None and name in spec.adapted_layers:
            a = adapter[f"{name}.lora_A.weight"].double()
            b = adapter[f"{name}.lora_B.weight"].double()
            w = w + (spec.lora.alpha / spec.lora.rank) * (b @ a)
        out[name] = (w, backbone[f"{name}.bias"].double())
    return out


def forward_row(spec: PolicySpec, backbone: dict, adapter: dict | None, obs_dim: int,
                obs: torch.Tensor, h: torch.Tensor | None, reset: bool, onehot: int | None = None):
    """obs [obs_max] (only the first obs_dim used), h [H] -> (head [act_max], h' [H]) in float64.
    `onehot`: the agent's one-hot column (specs with agent_onehot): input = [obs padded | e_onehot]."""
    lin = merged_linears(spec, backbone, adapter)
    act = torch.relu if spec.activation == "relu" else torch.tanh

    def ln(x, name):
        return F.layer_norm(x, x.shape, backbone[f"{name}.weight"].double(),
                            backbone[f"{name}.bias"].double(), 1e-5)

    def fc(x, name):
        w, b = lin[name]
        return w @ x + b

    x = torch.zeros(spec.obs_max + spec.agent_onehot, dtype=torch.float64)
    x[:obs_dim] = obs[:obs_dim].double()
    if spec.agent_onehot:
        x[spec.obs_max + onehot] = 1.0
    x = ln(x, "ln_in")
    for i in range(spec.mlp_depth):
        x = ln(act(fc(x, f"mlp.{i}")), f"mlp.{i}.ln")
    h_next = None
    if spec.recurrent:
        hp = torch.zeros(spec.hidden, dtype=torch.float64) if reset or h is None else h.double()
        gx, gh = fc(x, "gru.x"), fc(hp, "gru.h")
        H = spec.hidden
        r = torch.sigmoid(gx[:H] + gh[:H])
        z = torch.sigmoid(gx[H:2 * H] + gh[H:2 * H])
        n = torch.tanh(gx[2 * H:] + r * gh[2 * H:])
        h_next = (1 - z) * n + z * hp
        x = ln(h_next, "gru.ln")
    x = ln(act(fc(x, "post")), "post.ln")
    return fc(x, "head"), h_next


def forward_loop(spec: PolicySpec, backbone: dict, adapters: dict, agent_ids, obs, h=None,
                 reset=None):
    """Per-row loop over a mixed batch -> (head [B, act_max], h' [B, H] or None), float64."""
    heads, states = [], []
    for i, a in enumerate(agent_ids):
        ag = spec.agent(a)
        hi = None if h is None else h[i]
        ri = bool(reset[i]) if reset is not None else False
        oh = spec.onehot_index(spec.agent_ids.index(a)) if spec.agent_onehot else None
        out, hn = forward_row(spec, backbone, adapters.get(a), ag.obs_dim, obs[i], hi, ri, oh)
        heads.append(out)
        states.append(hn)
    return torch.stack(heads), (torch.stack(states) if spec.recurrent else None)


def zero_padding(spec: PolicySpec, agent_ids, obs):
    """obs [B, obs_max] (torch or numpy) with each row zeroed past its agent's obs_dim: random full-width
    test inputs made valid under the protocol's rule (non-zero padding is a wrong agent's row)."""
    obs = obs.clone() if isinstance(obs, torch.Tensor) else obs.copy()
    ids = [spec.agent_ids[int(a)] if not isinstance(a, str) else a for a in agent_ids]
    for i, a in enumerate(ids):
        obs[i, spec.agent(a).obs_dim:] = 0
    return obs
