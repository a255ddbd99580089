"""The actor as a plain `torch.nn.Module` whose 7 Linears PEFT can target (and train).

    from lorasa_serve.torch_module import ActorModule
    model = ActorModule.from_dir("policies/halfcheetah_2x3", "agent_0")   # backbone only
    out = model(obs, state, reset)      # out.mean [B, act_max] (zero past act_dim), out.log_std, out.state
    peft_model = peft.PeftModel.from_pretrained(model, "export/peft/agent_0")   # lorasa-export --peft

Submodules (state-dict keys <-> backbone tensor names: `lorasa_serve.peft_format.module_key`):
    ln_in, mlp.<i> (Linear), mlp_ln.<i>, gru.x, gru.h (Linears), gru_ln, post (Linear), post_ln,
    head (Linear), log_std [act_max] (Gaussian), std.offset [act_max] (the agent's log-std offset: the
    adapter's `log_std_offset`, zero in the backbone; PEFT keeps it per adapter with modules_to_save).
The forward is `lorasa_serve.network.actor_forward` op for op (GRU as `network.gru_cell`, PyTorch gate
order r, z, n, reset applied after h_layer), for one agent: obs columns past its obs_dim are zeroed,
Gaussian means past its act_dim are zero, Categorical logits past it (or not in `avail`) are masked.
Nothing is imported or built at import time beyond torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import peft_format
from .distributions import masked_logits
from .network import LN_EPS, gru_cell
from .spec import PolicySpec


class ActorOut(NamedTuple):
    head: Tensor  # Gaussian: mean [B, act_max], zero past act_dim; Categorical: masked logits [B, act_max]
    log_std: Tensor | None  # Gaussian: the agent's log-std [act_max] (backbone log_std + std.offset)
    state: Tensor | None  # next recurrent state [B, hidden] (None: not recurrent)


class LogStdOffset(nn.Module):
    """The agent's own log-std offset [act_max], added to the shared `log_std`."""

    def __init__(self, act_max: int):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(act_max))


class ActorModule(nn.Module):
    def __init__(self, spec: PolicySpec, backbone: dict[str, Tensor], agent_id: str | None = None):
        super().__init__()
        self.spec = spec
        self.name_or_path = peft_format.base_model_name(spec)  # PEFT's save_pretrained records it
        H, shapes = spec.hidden, spec.linear_shapes()
        lin = {n: nn.Linear(i, o) for n, (i, o) in shapes.items()}
        self.ln_in = nn.LayerNorm(spec.input_width, eps=LN_EPS)  # obs_max (+ the agent one-hot)
        self.mlp = nn.ModuleList(lin[f"mlp.{i}"] for i in range(spec.mlp_depth))
        self.mlp_ln = nn.ModuleList(nn.LayerNorm(H, eps=LN_EPS) for _ in range(spec.mlp_depth))
        if spec.recurrent:
            self.gru = nn.ModuleDict({"x": lin["gru.x"], "h": lin["gru.h"]})
            self.gru_ln = nn.LayerNorm(H, eps=LN_EPS)
        self.post, self.post_ln, self.head = lin["post"], nn.LayerNorm(H, eps=LN_EPS), lin["head"]
        if spec.action == "gaussian":
            self.log_std = nn.Parameter(torch.zeros(spec.act_max))
            self.std = LogStdOffset(spec.act_max)
        self.load_backbone(backbone)
        self.select_agent(agent_id or spec.agent_ids[0])

    @classmethod
    def from_dir(cls, path: str | Path, agent_id: str | None = None) -> "ActorModule":
        """The backbone of a policy directory (adapters are not applied: load them with PEFT)."""
        from .artifacts import load_policy
        spec, backbone, _ = load_policy(path)
        return cls(spec, backbone, agent_id)

    def load_backbone(self, backbone: dict[str, Tensor]) -> None:
        """Backbone tensors (our names) -> this module's parameters (`peft_format.module_key`)."""
        state = {peft_format.module_key(k): v for k, v in backbone.items()}
        if self.spec.action == "gaussian":
            state[peft_format.OFFSET_KEY] = torch.zeros(self.spec.act_max)
        self.load_state_dict(state, strict=True)

    def backbone(self) -> dict[str, Tensor]:
        """This module's parameters under our backbone tensor names (without std.offset)."""
        return {peft_format.tensor_name(k): v.detach().clone() for k, v in self.state_dict().items()
                if k != peft_format.OFFSET_KEY}

    def select_agent(self, agent_id: str) -> None:
        """Which agent's true sizes the forward applies (obs columns, action columns)."""
        a = self.spec.agent(agent_id)
        self.agent_id, self.obs_dim, self.act_dim = agent_id, a.obs_dim, a.act_dim
        K = self.spec.agent_onehot  # policies trained with an agent one-hot: this agent's column of it
        self.onehot = None if not K else F.one_hot(
            torch.tensor(self.spec.onehot_index(self.spec.agent_ids.index(agent_id))), K).float()  # [K]

    def forward(self, obs: Tensor, state: Tensor | None = None, reset: Tensor | None = None,
                avail: Tensor | None = None) -> ActorOut:
        """obs [B, <=obs_max], state [B, hidden] (None: zeros), reset [B] bool (zero that row's state),
        avail [B, <=act_max] bool (Categorical available actions) -> ActorOut."""
        spec = self.spec
        act = torch.relu if spec.activation == "relu" else torch.tanh
        x = F.pad(obs, (0, spec.obs_max - obs.shape[-1]))  # [B, obs_max]
        cols = torch.arange(spec.obs_max, device=x.device)
        x = x.masked_fill(cols >= self.obs_dim, 0.0)
        if self.onehot is not None:  # [B, obs_max + K], as every runtime appends it
            x = torch.cat([x, self.onehot.to(x).expand(x.shape[0], -1)], -1)
        x = self.ln_in(x)
        for lin, ln in zip(self.mlp, self.mlp_ln):
            x = ln(act(lin(x)))
        h_next = None
        if spec.recurrent:
            h = torch.zeros(x.shape[0], spec.hidden, device=x.device) if state is None else state
            if reset is not None:
                h = h.masked_fill(reset.unsqueeze(-1), 0.0)
            h_next = gru_cell(self.gru["x"](x), self.gru["h"](h), h)
            x = self.gru_ln(h_next)
        head = self.head(self.post_ln(act(self.post(x))))  # [B, act_max]
        dims = torch.arange(spec.act_max, device=head.device) < self.act_dim  # [act_max]
        if spec.action == "gaussian":
            return ActorOut(head * dims, self.log_std + self.std.offset, h_next)
        valid = dims if avail is None else dims & F.pad(avail.bool(), (0, spec.act_max - avail.shape[-1]))
        return ActorOut(masked_logits(head, valid.expand_as(head)), None, h_next)
