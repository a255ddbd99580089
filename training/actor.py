"""The actor's trainable parameters in each mode, exposed to `lorasa_serve.network.actor_forward`.

Training runs the *serving* forward over the grouped layout `[N_agents, M, D]` (chunk i = agent i):
  ps     one shared backbone (`[out, in]` weights) for every agent;
  nps    one full network per agent (`[N, in, out]` weights, `[N, 1, D]` norms, `[N, 1, A]` log-std);
  lora   the frozen PS backbone plus per-agent adapters (`lora_a [N, in, r]`, `lora_b [N, r, out]`).
The PS / LoRA parameters convert losslessly to a policy directory (PEFT layout A [r, in], B [out, r]).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from lorasa_serve.network import ActorParams, LinearP, NormP, init_adapter, init_backbone, shared_params
from lorasa_serve.spec import PolicySpec

Kind = Literal["ps", "nps", "lora"]


class Actor:
    def __init__(self, spec: PolicySpec, kind: Kind, trainable: dict[str, Tensor],
                 frozen: dict[str, Tensor] | None = None):
        self.spec, self.kind = spec, kind
        # sorted: the optimiser's parameter order must not depend on how the tensors were loaded
        self.trainable = {k: trainable[k].detach().clone().requires_grad_(True) for k in sorted(trainable)}
        self.frozen = {k: v.detach().clone() for k, v in (frozen or {}).items()}
        self.n = len(spec.agents)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def new_ps(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float) -> "Actor":
        bb = init_backbone(spec, g)
        if spec.action == "gaussian":
            bb["log_std"] = torch.full((spec.act_max,), init_log_std)
        return cls(spec, "ps", bb)

    @classmethod
    def new_nps(cls, spec: PolicySpec, g: torch.Generator, init_log_std: float) -> "Actor":
        """N independent backbones (each drawn like a PS one), stacked per agent in [N, in, out]."""
        per_agent = [cls.new_ps(spec, g, init_log_std).trainable for _ in spec.agents]
        t = {}
        for name in spec.linear_names():
            t[f"{name}.weight"] = torch.stack([b[f"{name}.weight"].T for b in per_agent])  # [N, in, out]
            t[f"{name}.bias"] = torch.stack([b[f"{name}.bias"] for b in per_agent]).unsqueeze(1)
        for name in spec.norm_names():
            for p in ("weight", "bias"):
                t[f"{name}.{p}"] = torch.stack([b[f"{name}.{p}"] for b in per_agent]).unsqueeze(1)
        if spec.action == "gaussian":
            t["log_std"] = torch.stack([b["log_std"] for b in per_agent]).unsqueeze(1)  # [N, 1, A]
        return cls(spec, "nps", t)

    @classmethod
    def lora_from_backbone(cls, spec: PolicySpec, backbone: dict[str, Tensor],
                           g: torch.Generator) -> "Actor":
        """Freeze `backbone`; fresh adapters (A random, B = 0), so the policy starts equal to PS."""
        adapters = {a: init_adapter(spec, g) for a in spec.agent_ids}
        return cls.lora_from_adapters(spec, backbone, adapters)

    @classmethod
    def lora_from_adapters(cls, spec: PolicySpec, backbone: dict[str, Tensor],
                           adapters: dict[str, dict[str, Tensor]]) -> "Actor":
        t = {}
        for name in spec.adapted_layers:
            t[f"{name}.lora_a"] = torch.stack([adapters[a][f"{name}.lora_A.weight"].T
                                               for a in spec.agent_ids])  # [N, in, r]
            t[f"{name}.lora_b"] = torch.stack([adapters[a][f"{name}.lora_B.weight"].T
                                               for a in spec.agent_ids])  # [N, r, out]
        return cls(spec, "lora", t, backbone)

    # --- forward parameters ---------------------------------------------------------------------
    def params(self) -> ActorParams:
        """ActorParams for a grouped batch `[N, M, D]` whose chunk i holds agent i's rows."""
        spec, t = self.spec, self.trainable
        if self.kind == "ps":
            return shared_params(spec, t)
        if self.kind == "nps":
            return ActorParams({n: LinearP(t[f"{n}.weight"], t[f"{n}.bias"]) for n in spec.linear_names()},
                               {n: NormP(t[f"{n}.weight"], t[f"{n}.bias"]) for n in spec.norm_names()})
        p = shared_params(spec, self.frozen)
        scale = spec.lora.scale
        for n in spec.adapted_layers:
            lp = p.linears[n]
            p.linears[n] = LinearP(lp.weight, lp.bias, t[f"{n}.lora_a"], t[f"{n}.lora_b"] * scale)
        return p

    def log_std(self) -> Tensor:
        """[A] shared or [N, 1, A] per agent (broadcasts against [N, M, A])."""
        if self.kind == "nps":
            return self.trainable["log_std"]
        return (self.frozen if self.kind == "lora" else self.trainable)["log_std"]

    # --- conversion to a servable policy ------------------------------------------------------
    def backbone(self) -> dict[str, Tensor]:
        if self.kind == "nps":
            raise ValueError("an NPS actor has no shared backbone")
        src = self.frozen if self.kind == "lora" else self.trainable
        return {k: v.detach().clone() for k, v in src.items()}

    def adapters(self) -> dict[str, dict[str, Tensor]] | None:
        """Per agent PEFT tensors: `<layer>.lora_A.weight` [r, in], `<layer>.lora_B.weight` [out, r]."""
        if self.kind != "lora":
            return None
        t = self.trainable
        return {a: {**{f"{n}.lora_A.weight": t[f"{n}.lora_a"][i].detach().T.contiguous()
                       for n in self.spec.adapted_layers},
                    **{f"{n}.lora_B.weight": t[f"{n}.lora_b"][i].detach().T.contiguous()
                       for n in self.spec.adapted_layers}}
                for i, a in enumerate(self.spec.agent_ids)}

    def servable(self) -> bool:
        return self.kind != "nps"

    def n_trainable(self) -> int:
        return sum(v.numel() for v in self.trainable.values())


def param_counts(spec: PolicySpec) -> dict[str, int]:
    """Actor parameters per agent under PS / NPS / LoRASA (counted from the spec's shapes).

    ps: the shared backbone counted once (all agents use it); nps: one backbone per agent, so per agent
    it is the backbone size; lorasa_adapter: one agent's adapter; totals are for the whole team.
    """
    import math
    backbone = sum(math.prod(s) for s in spec.backbone_shapes().values())
    adapter = sum(math.prod(s) for s in spec.adapter_shapes().values())
    n = len(spec.agents)
    return {"agents": n, "backbone": backbone, "ps_total": backbone, "nps_per_agent": backbone,
            "nps_total": n * backbone, "lorasa_adapter_per_agent": adapter,
            "lorasa_total": backbone + n * adapter}


def with_lora(spec: PolicySpec, rank: int, alpha: float, layers) -> PolicySpec:
    from lorasa_serve.spec import LoraSpec
    return replace(spec, lora=LoraSpec(rank, alpha, None if layers is None else tuple(layers)))
