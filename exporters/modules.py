"""Torch modules traced into ONNX: one agent with merged weights, or every agent with stacked adapters.

Both mirror `lorasa_serve.network.actor_forward` op for op; the GRU cell is `network.gru_cell`
(explicit MatMul/Sigmoid/Tanh with PyTorch's reset-after-h_layer semantics), never `nn.GRU`, so no
exporter can rewrite it with `linear_before_reset=0`. The export is checked against the Engine anyway.

Graph inputs/outputs (names and order: `lorasa_serve.onnx_contract`; B is dynamic):
  per agent   obs [B, obs_dim], state [B, H], reset [B] bool, avail [B, act_dim] bool (Categorical)
  multi-agent agent_index [B] int64, obs [B, obs_max], state, reset, avail [B, act_max] bool
  Gaussian:    action [B, A] (the mean, zero past each row's act_dim), mean [B, A], log_std [B, A]
  Categorical: action [B] int64 (masked argmax), logits [B, A] (unavailable: float32 min)
  recurrent:   state_out [B, H]
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorasa_serve.network import LN_EPS, gru_cell
from lorasa_serve.spec import AgentSpec, PolicySpec
from lorasa_serve.adapter_layout import dense_columns, onnx_lora, stack_adapters, stack_log_std
from lorasa_serve.distributions import dim_mask

LoraImpl = Literal["auto", "dense", "gather"]
DENSE_MAX_COLS = 512  # "auto": dense one-hot LoRA while agents * rank stays this narrow
NEG = torch.finfo(torch.float32).min  # masked logits, as lorasa_serve.distributions.masked_logits


def _key(name: str) -> str:
    return "p_" + name.replace(".", "_")  # buffer names must not collide with graph I/O names


class _Actor(nn.Module):
    """Shared trunk: buffers for norms and Linears, `_linear` supplied by the subclass."""

    def __init__(self, spec: PolicySpec, backbone: dict[str, Tensor]):
        super().__init__()
        self.spec = spec
        for n in spec.norm_names():
            self.register_buffer(_key(n) + "_w", backbone[f"{n}.weight"].detach().clone())
            self.register_buffer(_key(n) + "_b", backbone[f"{n}.bias"].detach().clone())

    def _norm(self, x: Tensor, name: str) -> Tensor:
        k = _key(name)
        return F.layer_norm(x, (x.shape[-1],), getattr(self, k + "_w"), getattr(self, k + "_b"), LN_EPS)

    def _trunk(self, linear: Callable[[Tensor, str], Tensor], obs: Tensor, h: Tensor | None,
               reset: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """obs [B, obs_max] -> (head [B, out], h' [B, H] or None), as network.actor_forward."""
        spec = self.spec
        act = torch.relu if spec.activation == "relu" else torch.tanh
        x = self._norm(obs, "ln_in")
        for i in range(spec.mlp_depth):
            x = self._norm(act(linear(x, f"mlp.{i}")), f"mlp.{i}.ln")
        h_next = None
        if spec.recurrent:
            h = torch.where(reset.unsqueeze(-1), torch.zeros_like(h), h)
            h_next = gru_cell(linear(x, "gru.x"), linear(h, "gru.h"), h)
            x = self._norm(h_next, "gru.ln")
        x = self._norm(act(linear(x, "post")), "post.ln")
        return linear(x, "head"), h_next

    def _outputs(self, head: Tensor, h_next: Tensor | None, dims: Tensor,
                 avail: Tensor | None, log_std: Tensor | None = None) -> tuple[Tensor, ...]:
        """head [B, A], dims [B, A] bool (or [A]: the agent's action columns), log_std [B, A] or [A]
        (Gaussian) -> the graph outputs."""
        if self.spec.action == "gaussian":
            mean = torch.where(dims, head, torch.zeros_like(head))
            outs = (mean, mean, (log_std * dims).expand_as(mean))
        else:
            valid = dims & avail
            logits = torch.where(valid, head, torch.full_like(head, NEG))
            outs = (logits.argmax(-1), logits)
        return outs + ((h_next,) if h_next is not None else ())

    def _unpack(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        rest = list(inputs)
        h, reset = (rest.pop(0), rest.pop(0)) if self.spec.recurrent else (None, None)
        avail = rest.pop(0) if self.spec.action == "categorical" else None
        return h, reset, avail


class MergedAgentActor(_Actor):
    """One agent, merged weights W0 + (alpha/r) B A; inputs and outputs at the agent's true sizes."""

    n_named = 1  # forward(obs, *inputs)

    def __init__(self, spec: PolicySpec, agent: AgentSpec, backbone: dict[str, Tensor],
                 merged: dict[str, Tensor], log_std: Tensor | None = None):
        """merged: Linear name -> W [out, in]; log_std [act_max]: the agent's own (None: the backbone's)."""
        super().__init__(spec, backbone)
        self.obs_dim, self.pad = agent.obs_dim, spec.obs_max - agent.obs_dim
        for n in spec.linear_names():
            w, b = merged[n].detach().clone(), backbone[f"{n}.bias"].detach().clone()
            if n == "head":  # head rows are independent: keep the agent's own actions only
                w, b = w[:agent.act_dim], b[:agent.act_dim]
            self.register_buffer(_key(n) + "_w", w)  # [out, in]
            self.register_buffer(_key(n) + "_b", b)
        if spec.action == "gaussian":
            own = backbone["log_std"] if log_std is None else log_std
            self.register_buffer("p_log_std", own[:agent.act_dim].detach().clone())
        self.register_buffer("dim_mask", torch.ones(agent.act_dim, dtype=torch.bool))
        self.onehot = bool(spec.agent_onehot)
        if self.onehot:  # [1, K]: this agent's column of the team's one-hot, appended to every row
            col = spec.onehot_index(spec.agent_ids.index(agent.agent_id))
            self.register_buffer("p_onehot", F.one_hot(torch.tensor([col]), spec.agent_onehot).float())

    def _lin(self, x: Tensor, name: str) -> Tensor:
        k = _key(name)
        return F.linear(x, getattr(self, k + "_w"), getattr(self, k + "_b"))

    def forward(self, obs: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        h, reset, avail = self._unpack(inputs)
        x = F.pad(obs, (0, self.pad)) if self.pad else obs  # ln_in normalises over obs_max
        if self.onehot:
            x = torch.cat([x, self.p_onehot.expand(x.shape[0], -1)], 1)  # [B, obs_max + K]
        head, h_next = self._trunk(self._lin, x, h, reset)
        return self._outputs(head, h_next, self.dim_mask, avail, getattr(self, "p_log_std", None))


class MultiAgentActor(_Actor):
    """Every agent in one graph: shared backbone GEMMs plus each row's own low-rank delta.

    `dense`: x @ [A_0 .. A_S] -> [B, S*r], zero every agent's block but the row's own, @ [B_0; ..; B_S]
    (plain MatMuls, exact, cheap while S*r is narrow). `gather`: per-row Gather of A/B + batched
    MatMul (cost independent of S, memory B*in*r per layer). `auto` picks by S*r.
    """

    n_named = 2  # forward(agent_index, obs, *inputs)

    def __init__(self, spec: PolicySpec, backbone: dict[str, Tensor],
                 adapters: dict[str, dict[str, Tensor] | None], lora_impl: LoraImpl = "auto"):
        super().__init__(spec, backbone)
        S, r = len(spec.agents), spec.lora.rank
        self.impl = ("dense" if S * r <= DENSE_MAX_COLS else "gather") if lora_impl == "auto" else lora_impl
        for n in spec.linear_names():
            self.register_buffer(_key(n) + "_w", backbone[f"{n}.weight"].detach().clone())
            self.register_buffer(_key(n) + "_b", backbone[f"{n}.bias"].detach().clone())
        any_adapter = any(adapters.get(a) is not None for a in spec.agent_ids)
        self.adapted = spec.adapted_layers if any_adapter else []  # a plain policy: backbone only
        for n in self.adapted:  # dense: A [in, S*r], B [S*r, out]; gather: A [S, in, r], B [S, r, out]
            a_r, b_t = stack_adapters(spec, n, [adapters.get(x) for x in spec.agent_ids], "cpu")
            a, b = onnx_lora(a_r, b_t, dense=self.impl == "dense")
            self.register_buffer(_key(n) + "_a", a)
            self.register_buffer(_key(n) + "_bb", b)
        self.register_buffer("col_agent", dense_columns(S, r))  # [S*r]
        self.register_buffer("obs_dims", torch.tensor([a.obs_dim for a in spec.agents]))
        self.register_buffer("act_dims", torch.tensor([a.act_dim for a in spec.agents]))
        self.register_buffer("obs_cols", torch.arange(spec.obs_max))
        self.onehot = bool(spec.agent_onehot)
        if self.onehot:  # [S, K]: row s = agent s's one-hot
            cols = torch.tensor([spec.onehot_index(i) for i in range(S)])
            self.register_buffer("p_onehot", F.one_hot(cols, spec.agent_onehot).float())
        self.per_agent_log_std = False  # p_log_std [S, act_max] (True) or the shared [act_max]
        if spec.action == "gaussian":  # [S, act_max] per agent when adapters carry offsets, else [act_max]
            per_agent = stack_log_std(spec, backbone["log_std"], [adapters.get(x) for x in spec.agent_ids])
            self.register_buffer("p_log_std", (backbone["log_std"] if per_agent is None else per_agent
                                               ).detach().clone())
            self.per_agent_log_std = per_agent is not None

    def forward(self, agent_index: Tensor, obs: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        h, reset, avail = self._unpack(inputs)
        adapted = set(self.adapted)
        rows = agent_index
        sel = (rows.unsqueeze(1) == self.col_agent).to(obs.dtype) if self.impl == "dense" else None

        def linear(x: Tensor, name: str) -> Tensor:
            k = _key(name)
            y = F.linear(x, getattr(self, k + "_w"), getattr(self, k + "_b"))
            if name not in adapted:
                return y
            a, b = getattr(self, k + "_a"), getattr(self, k + "_bb")
            if self.impl == "dense":
                return y + (x @ a * sel) @ b
            low = torch.bmm(x.unsqueeze(1), a[rows])  # [B, 1, r]
            return y + torch.bmm(low, b[rows]).squeeze(1)

        obs = torch.where(self.obs_cols < self.obs_dims[rows].unsqueeze(1), obs, torch.zeros_like(obs))
        if self.onehot:
            obs = torch.cat([obs, self.p_onehot[rows]], 1)  # [B, obs_max + K]
        head, h_next = self._trunk(linear, obs, h, reset)
        log_std = getattr(self, "p_log_std", None)
        if self.per_agent_log_std:
            log_std = log_std[rows]  # [B, act_max]: each row's agent's own
        return self._outputs(head, h_next, dim_mask(self.act_dims, rows, self.spec.act_max), avail, log_std)
