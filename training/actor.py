"""The actor's trainable parameters in each mode, exposed to `lorasa_serve.network.actor_forward`.

Training runs the *serving* forward over the grouped layout `[N_agents, M, D]` (chunk i = agent i).
Every tensor is either shared (the PS backbone's shape, e.g. a Linear weight `[out, in]`) or per group
(`[G, in, out]` weights, `[G, 1, D]` biases / norms, `[G, 1, A]` log-std), and `groups[i]` names agent
i's group. The modes are just choices of which tensors are per group and how agents are grouped:

  ps     every tensor shared (one network for all agents);
  nps    every tensor per group, one group per agent (independent networks);
  seps   every tensor per group, agents clustered into G < N groups (selective parameter sharing);
  mtl    a shared trunk (input norm, MLP, GRU) with per-agent output heads (post, post.ln, head, log-std);
  lora   a frozen PS or SePS base plus per-agent adapters (`lora_a [N, in, r]`, `lora_b [N, r, out]`)
         and, by default, a per-agent Gaussian log-std offset (`log_std_offset [N, 1, A]`, zero at the
         switch, added to the frozen shared log-std: the paper's code, lora_v3/distributions.py).
PS / PS+LoRA parameters convert losslessly to a policy directory (PEFT layout A [r, in], B [out, r],
plus `log_std_offset` [A] per adapter); every adapter layout and conversion: `lorasa_serve.adapter_layout`.
Which tensors are per group is decided once, at construction (`per_group`: those not of the
backbone's shared shape), and handed to the forward as each layer's `per_chunk` flag.

Per-group tensors are gathered to per agent by `groups` (SePS: several agents share a group's row);
per-agent tensors (adapters, log-std offsets: leading dim N) are never gathered, row i is agent i's.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lorasa_serve import adapter_layout
from lorasa_serve.adapter_layout import LOG_STD_OFFSET, adapter_shapes
from lorasa_serve.network import (ActorParams, LinearP, NormP, init_adapter, init_adapter_reference,
                                  init_backbone)
from lorasa_serve.spec import PolicySpec

Kind = Literal["ps", "nps", "seps", "mtl", "lora"]
LoraInit = Literal["peft", "reference"]
MTL_HEAD = ("post", "post.ln", "head")  # MTL: the per-agent layers (plus log-std)


class Actor:
    def __init__(self, spec: PolicySpec, kind: Kind, trainable: dict[str, Tensor],
                 frozen: dict[str, Tensor] | None = None, groups: tuple[int, ...] | None = None):
        self.spec, self.kind = spec, kind
        self.n = len(spec.agents)
        self.groups = tuple(range(self.n)) if groups is None else tuple(int(x) for x in groups)
        if len(self.groups) != self.n:
            raise ValueError(f"groups {self.groups} must name one group per agent ({self.n})")
        # sorted: the optimiser's parameter order must not depend on how the tensors were loaded
        self.trainable = {k: trainable[k].detach().clone().requires_grad_(True) for k in sorted(trainable)}
        self.frozen = {k: v.detach().clone() for k, v in (frozen or {}).items()}
        shared = spec.backbone_shapes()  # a backbone tensor of another shape is per group: [G, ...]
        self.per_group = frozenset(k for k, v in {**self.frozen, **self.trainable}.items()
                                   if k in shared and tuple(v.shape) != shared[k])
        self._index = torch.tensor(self.groups, dtype=torch.long)
        self._identity = self.groups == tuple(range(self.n))
        self._acting: tuple[tuple[int, ...], ActorParams, Tensor | None] | None = None  # see params()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def new_ps(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float) -> "Actor":
        return cls(spec, "ps", _fresh_backbone(spec, g, init_log_std), groups=(0,) * len(spec.agents))

    @classmethod
    def new_nps(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float) -> "Actor":
        """N independent backbones (each drawn like a PS one), stacked per agent."""
        return cls.new_grouped(spec, g, init_log_std, tuple(range(len(spec.agents))), "nps")

    @classmethod
    def new_seps(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float,
                 groups: tuple[int, ...]) -> "Actor":
        """One network per group of agents (groups[i] = agent i's group, 0 .. G-1)."""
        return cls.new_grouped(spec, g, init_log_std, groups, "seps")

    @classmethod
    def new_mtl(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float) -> "Actor":
        """A shared trunk with one output head (post, post.ln, head, log-std) per agent."""
        return cls.new_grouped(spec, g, init_log_std, tuple(range(len(spec.agents))), "mtl", MTL_HEAD)

    @classmethod
    def new_grouped(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float,
                    groups: tuple[int, ...], kind: Kind, layers: tuple[str, ...] | None = None) -> "Actor":
        """Per-group copies (drawn independently) of `layers` (None: all) and log-std; the rest shared."""
        n_groups = max(groups) + 1
        if sorted(set(groups)) != list(range(n_groups)):
            raise ValueError(f"groups {groups} must use every group 0 .. {n_groups - 1}")
        per_group = [_fresh_backbone(spec, g, init_log_std) for _ in range(n_groups)]
        t = dict(per_group[0])
        for name, value in per_group[0].items():
            layer = name.rsplit(".", 1)[0]
            if layers is None or layer in layers or name == "log_std":
                t[name] = _per_group(spec, name, [b[name] for b in per_group])
        return cls(spec, kind, t, groups=tuple(groups))

    @classmethod
    def lora_from_base(cls, base: "Actor", g: torch.Generator, spec: PolicySpec | None = None,
                       init: LoraInit = "peft") -> "Actor":
        """Freeze `base` (PS or SePS); fresh adapters with dW = 0 and log-std offsets 0 (if the spec's
        adapters carry them), so the policy starts equal to it. `init`: "peft" draws A ~ kaiming-uniform,
        B = 0; "reference" A = 0, B ~ kaiming-uniform (the paper's code). `spec`: the base's spec with
        another LoRA configuration (rank, alpha, layers, log_std_offset)."""
        spec = spec or base.spec
        draw = init_adapter if init == "peft" else init_adapter_reference
        adapters = {a: draw(spec, g) for a in spec.agent_ids}
        base_tensors = {k: v.detach().clone() for k, v in {**base.frozen, **base.trainable}.items()}
        return cls.lora_from_adapters(spec, base_tensors, adapters, base.groups)

    @classmethod
    def lora_from_backbone(cls, spec: PolicySpec, backbone: dict[str, Tensor],
                           g: torch.Generator) -> "Actor":
        return cls.lora_from_base(cls(spec, "ps", backbone, groups=(0,) * len(spec.agents)), g)

    @classmethod
    def lora_from_adapters(cls, spec: PolicySpec, base: dict[str, Tensor],
                           adapters: dict[str, dict[str, Tensor]],
                           groups: tuple[int, ...] | None = None) -> "Actor":
        t = adapter_layout.to_training(spec, [adapters[x] for x in spec.agent_ids])
        return cls(spec, "lora", t, base, groups or (0,) * len(spec.agents))

    # --- forward parameters ---------------------------------------------------------------------
    def _get(self, name: str) -> Tensor:
        """Tensor `name` for the grouped batch: shared as stored, per group gathered to per agent."""
        t = self.trainable.get(name)
        if t is None:
            t = self.frozen[name]
        if name in self.per_group and not self._identity:
            t = t.index_select(0, self._index)  # [G, ...] -> [N, ...] (differentiable)
        return t

    def params(self) -> ActorParams:
        """ActorParams for a grouped batch `[N, M, D]` whose chunk i holds agent i's rows.

        Without autograd (acting in rollouts and evaluations) the result is built once and reused until
        a trainable tensor changes in place (an optimiser step bumps its version): per-group weights
        are then not gathered again at every environment step."""
        return self._acting_params()[0] if not torch.is_grad_enabled() else self._params()

    @property
    def per_agent_log_std(self) -> bool:
        """`log_std()` is [N, 1, A] (per group, or with per-agent offsets), not the shared [A]."""
        return "log_std" in self.per_group or LOG_STD_OFFSET in self.trainable

    def log_std(self) -> Tensor:
        """[A] shared or [N, 1, A] per agent (`per_agent_log_std`; broadcasts against [N, M, A])."""
        return self._acting_params()[1] if not torch.is_grad_enabled() else self._log_std()

    def _log_std(self) -> Tensor:
        """The shared (or per-group, gathered) log-std plus the per-agent offsets of a LoRA actor."""
        log_std = self._get("log_std")  # [A] or [N, 1, A]
        offset = self.trainable.get(LOG_STD_OFFSET)  # [N, 1, A]: row i is agent i's, never gathered
        return log_std if offset is None else log_std + offset

    def freeze(self, name: str) -> None:
        """Stop training trainable tensor `name` (it keeps its optimiser slot, which then gets no
        gradient: Adam skips it, so a continued run's optimiser state still loads)."""
        self.trainable[name].requires_grad_(False)

    def _acting_params(self) -> tuple[ActorParams, Tensor | None]:
        key = tuple(v._version for v in self.trainable.values())
        if self._acting is None or self._acting[0] != key:
            log_std = self._log_std() if self.spec.action == "gaussian" else None
            self._acting = (key, self._params(), log_std)
        return self._acting[1], self._acting[2]

    def _params(self) -> ActorParams:
        spec, per_group = self.spec, self.per_group
        linears = {}
        for n in spec.linear_names():
            w, b = self._get(f"{n}.weight"), self._get(f"{n}.bias")  # shared, or per agent [N, ...]
            la = self.trainable.get(adapter_layout.training_a_key(n))
            lb = self.trainable.get(adapter_layout.training_b_key(n))
            linears[n] = LinearP(w, b, la, None if lb is None else adapter_layout.scaled_b(spec, lb),
                                 per_chunk=f"{n}.weight" in per_group)
        norms = {n: NormP(self._get(f"{n}.weight"), self._get(f"{n}.bias"), f"{n}.weight" in per_group)
                 for n in spec.norm_names()}
        return ActorParams(linears, norms)

    def group_rows(self) -> dict[str, Tensor]:
        """For each per-group / per-agent trainable tensor, which leading index belongs to which agent:
        name -> [N] long (the group of agent i; identity for adapters). Shared tensors are absent."""
        out = {}
        for k in self.trainable:
            if adapter_layout.is_training_adapter_key(k):
                out[k] = torch.arange(self.n)
            elif k in self.per_group:
                out[k] = self._index
        return out

    # --- conversion to a servable policy ------------------------------------------------------
    def backbone(self) -> dict[str, Tensor]:
        if not self.servable():
            raise ValueError(f"a {self.kind} actor has per-group weights, not one shared backbone")
        src = self.frozen if self.kind == "lora" else self.trainable
        return {k: v.detach().clone() for k, v in src.items()}

    def adapters(self) -> dict[str, dict[str, Tensor]] | None:
        """Per agent PEFT tensors: `<layer>.lora_A.weight` [r, in], `<layer>.lora_B.weight` [out, r]."""
        if self.kind != "lora":
            return None
        return dict(zip(self.spec.agent_ids, adapter_layout.from_training(self.spec, self.trainable)))

    def servable(self) -> bool:
        """A policy directory needs one shared backbone: PS, or LoRA over a PS base."""
        base = self.frozen if self.kind == "lora" else self.trainable
        return not self.per_group & base.keys()

    def n_trainable(self) -> int:
        return sum(v.numel() for v in self.trainable.values() if v.requires_grad)

    def n_total(self) -> int:
        """Every actor parameter the team needs at inference (frozen base included)."""
        return sum(v.numel() for v in {**self.frozen, **self.trainable}.values())


def _fresh_backbone(spec: PolicySpec, g: torch.Generator, init_log_std: float) -> dict[str, Tensor]:
    bb = init_backbone(spec, g)
    if spec.action == "gaussian":
        bb["log_std"] = torch.full((spec.act_max,), init_log_std)
    return bb


def _per_group(spec: PolicySpec, name: str, copies: list[Tensor]) -> Tensor:
    """G groups' copies of shared tensor `name` -> its per-group layout: a Linear weight [out, in] each
    -> [G, in, out] (`adapter_layout.per_chunk_weight`), any other [D] each -> [G, 1, D]."""
    if name.endswith(".weight") and name.removesuffix(".weight") in spec.linear_names():
        return adapter_layout.per_chunk_weight(copies)
    return torch.stack([c.unsqueeze(0) for c in copies])


def param_counts(spec: PolicySpec) -> dict[str, int]:
    """Actor parameters per agent under PS / NPS / LoRASA (counted from the spec's shapes).

    ps: the shared backbone counted once (all agents use it); nps: one backbone per agent, so per agent
    it is the backbone size; lorasa_adapter: one agent's adapter; totals are for the whole team.
    """
    import math
    backbone = sum(math.prod(s) for s in spec.backbone_shapes().values())
    adapter = sum(math.prod(s) for s in adapter_shapes(spec).values())
    n = len(spec.agents)
    return {"agents": n, "backbone": backbone, "ps_total": backbone, "nps_per_agent": backbone,
            "nps_total": n * backbone, "lorasa_adapter_per_agent": adapter,
            "lorasa_total": backbone + n * adapter}
