"""AdapterBank: an immutable snapshot of everything a forward reads.

Backbone, per-agent adapters stacked into fixed-shape slots (vLLM style: `a_t[layer] [S, in, r]`,
`b_t[layer] [S, r, out]` with alpha/r folded into B), merged weights for merged agents, versions.
Writers (hot-swap, add agent, merge) build a new bank and publish it with one reference
assignment, so a forward that started on the old bank finishes on it: nobody sees half an adapter.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from .network import ActorParams, LinearP, NormP
from .spec import AgentSpec, PolicySpec

PARAMS_CACHE_SIZE = 4  # assembled ActorParams per (mode, layout) kept per bank


@dataclass(frozen=True)
class AdapterBank:
    spec: PolicySpec
    backbone: dict[str, Tensor]  # on device, PyTorch layout
    slot_of: dict[str, int]  # agent id -> slot
    adapters: tuple[dict[str, Tensor] | None, ...]  # per slot, PEFT layout (None: backbone only)
    versions: tuple[int, ...]  # per slot
    a_t: dict[str, Tensor]  # adapted layer -> [S, in, r]
    b_t: dict[str, Tensor]  # adapted layer -> [S, r, out], scaled by alpha / r
    merged: dict[int, dict[str, Tensor]]  # slot -> adapted layer -> merged W [out, in]
    obs_dims: Tensor  # [S] int64
    act_dims: Tensor  # [S] int64
    _cache: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)
    _seen: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def n_slots(self) -> int:
        return len(self.versions)

    @cached_property
    def merged_bytes_per_agent(self) -> int:
        shapes = self.spec.linear_shapes()
        return 4 * sum(shapes[n][0] * shapes[n][1] for n in self.spec.adapted_layers)

    def seen(self, key: bytes) -> int:
        """How often a layout was planned on this bank (bounded LRU of 64 layouts)."""
        with self._cache_lock:
            n = self._seen.pop(key, 0) + 1
            self._seen[key] = n
            while len(self._seen) > 64:
                self._seen.popitem(last=False)
        return n

    @property
    def has_adapters(self) -> bool:
        return any(a is not None for a in self.adapters)

    @property
    def heterogeneous(self) -> bool:
        return self.spec.heterogeneous

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: PolicySpec, backbone: dict[str, Tensor],
              adapters: dict[str, dict[str, Tensor]], device: torch.device) -> "AdapterBank":
        backbone = {k: v.to(device) for k, v in backbone.items()}
        ids = spec.agent_ids
        per_slot = tuple(_to(adapters.get(a), device) for a in ids)
        a_t, b_t = {}, {}
        for layer in spec.adapted_layers:
            a_t[layer] = torch.stack([_lora_a_t(spec, layer, ad, device) for ad in per_slot])
            b_t[layer] = torch.stack([_lora_b_t(spec, layer, ad, device) for ad in per_slot])
        return cls(spec, backbone, {a: i for i, a in enumerate(ids)}, per_slot,
                   tuple(1 for _ in ids), a_t, b_t, {}, *_dims(spec, device))

    def with_adapter(self, agent_id: str, adapter: dict[str, Tensor] | None,
                     agent: AgentSpec | None = None) -> "AdapterBank":
        """A new bank with `agent_id`'s adapter replaced (or a new agent appended)."""
        spec, dev = self.spec, self.obs_dims.device
        adapter = _to(adapter, dev)
        slot = self.slot_of.get(agent_id)
        a_t, b_t = dict(self.a_t), dict(self.b_t)
        if slot is None:  # new agent: grow every stack by one slot
            assert agent is not None
            spec = spec.with_agents(spec.agents + (agent,))
            slot = self.n_slots
            for layer in spec.adapted_layers:
                a_t[layer] = torch.cat([a_t[layer], _lora_a_t(spec, layer, adapter, dev)[None]])
                b_t[layer] = torch.cat([b_t[layer], _lora_b_t(spec, layer, adapter, dev)[None]])
            adapters = self.adapters + (adapter,)
            versions = self.versions + (1,)
            slot_of = {**self.slot_of, agent_id: slot}
        else:
            for layer in spec.adapted_layers:
                a_t[layer] = a_t[layer].clone()
                a_t[layer][slot] = _lora_a_t(spec, layer, adapter, dev)
                b_t[layer] = b_t[layer].clone()
                b_t[layer][slot] = _lora_b_t(spec, layer, adapter, dev)
            adapters = self.adapters[:slot] + (adapter,) + self.adapters[slot + 1:]
            versions = self.versions[:slot] + (self.versions[slot] + 1,) + self.versions[slot + 1:]
            slot_of = self.slot_of
        merged = dict(self.merged)
        bank = replace(self, spec=spec, slot_of=slot_of, adapters=adapters, versions=versions,
                       a_t=a_t, b_t=b_t, merged=merged, _cache=OrderedDict(),
                       _seen=OrderedDict(), _cache_lock=threading.Lock())
        if slot in merged:  # keep a merged agent merged, with its new weights
            merged[slot] = bank.merged_weights(slot)
        if agent is not None:
            return replace(bank, **dict(zip(("obs_dims", "act_dims"), _dims(spec, dev))))
        return bank

    def with_merged(self, slots: list[int], merge: bool) -> "AdapterBank":
        merged = dict(self.merged)
        for s in slots:
            if merge:
                merged[s] = merged.get(s) or self.merged_weights(s)
            else:
                merged.pop(s, None)
        return replace(self, merged=merged, _cache=OrderedDict(), _seen=OrderedDict(),
                       _cache_lock=threading.Lock())

    def merged_weights(self, slot: int) -> dict[str, Tensor]:
        """Adapted layer -> W0 + (alpha/r) B A, [out, in]. The backbone is never modified."""
        ad, spec = self.adapters[slot], self.spec
        out = {}
        for layer in spec.adapted_layers:
            w0 = self.backbone[f"{layer}.weight"]
            if ad is None:
                out[layer] = w0.clone()
            else:
                delta = ad[f"{layer}.lora_B.weight"] @ ad[f"{layer}.lora_A.weight"]
                out[layer] = w0 + spec.lora.scale * delta
        return out

    # --- per-forward parameters -------------------------------------------------------------
    def params(self, mode: str, chunk_slot: np.ndarray, key: bytes) -> ActorParams:
        """ActorParams for chunks `chunk_slot` [C]; mode 'lora', 'merged' or 'shared'."""
        ck = (mode, key)
        with self._cache_lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                return hit
        p = self._assemble(mode, chunk_slot)
        with self._cache_lock:
            self._cache[ck] = p
            while len(self._cache) > PARAMS_CACHE_SIZE:
                self._cache.popitem(last=False)
        return p

    def _assemble(self, mode: str, chunk_slot: np.ndarray) -> ActorParams:
        bb, spec = self.backbone, self.spec
        norms = {n: NormP(bb[f"{n}.weight"], bb[f"{n}.bias"]) for n in spec.norm_names()}
        linears = {n: LinearP(bb[f"{n}.weight"], bb[f"{n}.bias"]) for n in spec.linear_names()}
        if mode == "shared":
            return ActorParams(linears, norms)
        dev = self.obs_dims.device
        identity = len(chunk_slot) == self.n_slots and (chunk_slot == np.arange(self.n_slots)).all()
        idx = torch.as_tensor(chunk_slot, device=dev)
        for layer in spec.adapted_layers:
            lp = linears[layer]
            if mode == "lora":
                lp.lora_a = self.a_t[layer] if identity else self.a_t[layer].index_select(0, idx)
                lp.lora_b = self.b_t[layer] if identity else self.b_t[layer].index_select(0, idx)
            elif len(chunk_slot) == 1:  # one chunk: a plain shared GEMM with merged weights
                lp.weight = self.merged[int(chunk_slot[0])][layer]
            else:
                lp.weight = torch.stack([self.merged[int(s)][layer].T for s in chunk_slot])
        return ActorParams(linears, norms)


def _to(adapter: dict[str, Tensor] | None, device: torch.device) -> dict[str, Tensor] | None:
    return None if adapter is None else {k: v.to(device, torch.float32) for k, v in adapter.items()}


def _lora_a_t(spec: PolicySpec, layer: str, ad: dict[str, Tensor] | None,
              device: torch.device) -> Tensor:
    i, _ = spec.linear_shapes()[layer]
    if ad is None:
        return torch.zeros(i, spec.lora.rank, device=device)
    return ad[f"{layer}.lora_A.weight"].T.contiguous()  # [in, r]


def _lora_b_t(spec: PolicySpec, layer: str, ad: dict[str, Tensor] | None,
              device: torch.device) -> Tensor:
    _, o = spec.linear_shapes()[layer]
    if ad is None:
        return torch.zeros(spec.lora.rank, o, device=device)
    return (ad[f"{layer}.lora_B.weight"].T * spec.lora.scale).contiguous()  # [r, out]


def _dims(spec: PolicySpec, device: torch.device) -> tuple[Tensor, Tensor]:
    obs = torch.tensor([a.obs_dim for a in spec.agents], dtype=torch.int64, device=device)
    act = torch.tensor([a.act_dim for a in spec.agents], dtype=torch.int64, device=device)
    return obs, act
