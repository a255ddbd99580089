"""The LoRASA actor as a functional forward over a *grouped* batch.

Rows are laid out as `[C, M, D]`: C chunks of M rows (`lorasa_serve/layout.py` plans them). Each
Linear's parameters are either shared (one `[out, in]` weight for all chunks, the PS backbone) or per
chunk (`[C, in, out]`, merged or NPS weights: every row of such a chunk belongs to one agent or group),
as its `per_chunk` flag says, plus an optional low-rank delta per chunk (`lora_a [C, in, r]`,
`lora_b [C, r, out]` with alpha/r folded in; every layout: `lorasa_serve.adapter_layout`). A chunk of a
mixed plan holds rows of up to P agents: its delta is their P adapters side by side (`[C, in, P*r]`,
`[C, P*r, out]`) and `lora_mask [C, M, P*r]` keeps each row's own agent's r columns. The same function
therefore runs PS, NPS, SePS, PS+LoRA (training) and both serving modes (unmerged LoRA, merged), and
the engine only has to decide the layout and which tensors to pass.

Actor (README, "Policy directory format"): LayerNorm(obs) -> [Linear -> act -> LayerNorm] x mlp_depth -> GRU (gru.x, gru.h)
-> LayerNorm -> Linear (post) -> act -> LayerNorm -> head (Gaussian mean or Categorical logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapter_layout import LOG_STD_OFFSET, adapter_shapes, lora_a_key, lora_b_key
from .spec import PolicySpec

LN_EPS = 1e-5


@dataclass
class LinearP:
    weight: Tensor  # shared [out, in], or per chunk [C, in, out]
    bias: Tensor  # shared [out], or per chunk [C, 1, out]
    lora_a: Tensor | None = None  # [C, in, r] (always per chunk)
    lora_b: Tensor | None = None  # [C, r, out], already scaled by alpha / r
    # chunks holding several agents: lora_a [C, in, P*r], lora_b [C, P*r, out] (the P adapters side
    # by side) and lora_mask [C, M, P*r] 0/1 keeping each row's own agent's r columns
    lora_mask: Tensor | None = None
    per_chunk: bool = False  # weight and bias per chunk (True) or shared by every chunk (False)


@dataclass
class NormP:
    weight: Tensor  # shared [D], or per chunk [C, 1, D]
    bias: Tensor  # shared [D], or per chunk [C, 1, D]
    per_chunk: bool = False  # weight and bias per chunk (True) or shared (False)


@dataclass
class ActorParams:
    linears: dict[str, LinearP]
    norms: dict[str, NormP]


def linear(x: Tensor, p: LinearP) -> Tensor:
    """x [C, M, in] -> [C, M, out]."""
    if not p.per_chunk:
        C, M, i = x.shape
        y = torch.addmm(p.bias, x.reshape(C * M, i), p.weight.T).view(C, M, -1)
    else:
        y = torch.baddbmm(p.bias, x, p.weight)
    if p.lora_a is not None:
        inplace = torch.is_inference_mode_enabled()
        xa = torch.bmm(x, p.lora_a)  # [C, M, r] (or [C, M, P*r])
        if p.lora_mask is not None:
            xa = xa.mul_(p.lora_mask) if inplace else xa * p.lora_mask
        y = y.baddbmm_(xa, p.lora_b) if inplace else torch.baddbmm(y, xa, p.lora_b)  # + xa @ B
    return y


def norm(x: Tensor, p: NormP) -> Tensor:
    """LayerNorm over the last dim with shared or per-chunk affine."""
    d = x.shape[-1]
    if not p.per_chunk:
        return F.layer_norm(x, (d,), p.weight, p.bias, LN_EPS)
    return torch.addcmul(p.bias, F.layer_norm(x, (d,), None, None, LN_EPS), p.weight)


def gru_cell(gx: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """PyTorch GRU gate order (r, z, n), reset applied after h_layer (linear_before_reset=1).

    gx = x_layer(x), gh = h_layer(h): [..., 3H]; h: [..., H].
    """
    H = h.shape[-1]
    rz = torch.sigmoid(gx[..., :2 * H] + gh[..., :2 * H])  # both gates in one op
    r, z = rz[..., :H], rz[..., H:]
    n = torch.tanh(torch.addcmul(gx[..., 2 * H:], r, gh[..., 2 * H:]))
    return torch.lerp(n, h, z)  # (1 - z) * n + z * h


def actor_forward(spec: PolicySpec, p: ActorParams, obs: Tensor, h: Tensor | None,
                  reset: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """obs [C, M, input_width] (obs_max, plus the agent one-hot if the spec has one), h [C, M, H],
    reset [C, M] bool -> (head out [C, M, act_max], h' or None).

    `reset` True zeroes that row's recurrent state before the GRU (episode start).
    """
    act = torch.relu if spec.activation == "relu" else torch.tanh
    x = norm(obs, p.norms["ln_in"])
    for i in range(spec.mlp_depth):
        x = norm(act(linear(x, p.linears[f"mlp.{i}"])), p.norms[f"mlp.{i}.ln"])
    h_next = None
    if spec.recurrent:
        assert h is not None
        if reset is not None:
            h = h.masked_fill(reset.unsqueeze(-1), 0.0)
        h_next = gru_cell(linear(x, p.linears["gru.x"]), linear(h, p.linears["gru.h"]), h)
        x = norm(h_next, p.norms["gru.ln"])
    x = norm(act(linear(x, p.linears["post"])), p.norms["post.ln"])
    return linear(x, p.linears["head"]), h_next


def slice_chunks(p: ActorParams, sl: slice) -> ActorParams:
    """The parameters of chunks `sl` (per-chunk tensors sliced along C; shared ones as they are)."""
    def cut(t: Tensor | None, per_chunk: bool = True) -> Tensor | None:
        return t[sl] if t is not None and per_chunk else t
    linears = {n: LinearP(cut(q.weight, q.per_chunk), cut(q.bias, q.per_chunk), cut(q.lora_a),
                          cut(q.lora_b), cut(q.lora_mask), q.per_chunk)
               for n, q in p.linears.items()}
    norms = {n: NormP(cut(q.weight, q.per_chunk), cut(q.bias, q.per_chunk), q.per_chunk)
             for n, q in p.norms.items()}
    return ActorParams(linears, norms)


def shared_params(spec: PolicySpec, backbone: dict[str, Tensor]) -> ActorParams:
    """ActorParams with every weight shared (the PS backbone), no adapters."""
    linears = {n: LinearP(backbone[f"{n}.weight"], backbone[f"{n}.bias"]) for n in spec.linear_names()}
    norms = {n: NormP(backbone[f"{n}.weight"], backbone[f"{n}.bias"]) for n in spec.norm_names()}
    return ActorParams(linears, norms)


def init_backbone(spec: PolicySpec, generator: torch.Generator | None = None,
                  gain: float = 2 ** 0.5, head_gain: float = 0.01) -> dict[str, Tensor]:
    """Fresh backbone weights: orthogonal Linears (MAPPO's init), unit LayerNorms, zero biases."""
    out: dict[str, Tensor] = {}
    for name, n in spec.norm_shapes().items():
        out[f"{name}.weight"] = torch.ones(n)
        out[f"{name}.bias"] = torch.zeros(n)
    for name, (i, o) in spec.linear_shapes().items():
        w = torch.empty(o, i)
        g = head_gain if name == "head" else gain
        if name.startswith("gru."):
            # one orthogonal block per gate, as nn.GRU initialisers do
            for k in range(3):
                blk = torch.empty(o // 3, i)
                _orthogonal(blk, 1.0, generator)
                w[k * (o // 3):(k + 1) * (o // 3)] = blk
        else:
            _orthogonal(w, g, generator)
        out[f"{name}.weight"] = w
        out[f"{name}.bias"] = torch.zeros(o)
    if spec.action == "gaussian":
        out["log_std"] = torch.zeros(spec.act_max)
    return out


def _orthogonal(w: Tensor, gain: float, generator: torch.Generator | None) -> None:
    rows, cols = w.shape
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=generator)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.T
    with torch.no_grad():
        w.copy_(gain * q[:rows, :cols])


def init_adapter(spec: PolicySpec, generator: torch.Generator | None = None,
                 b_std: float = 0.0) -> dict[str, Tensor]:
    """A fresh adapter, PEFT convention: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (dW starts at 0).

    `b_std > 0` draws B from N(0, b_std) instead (tests and demos need adapters that differ), and
    a `log_std_offset` (when the spec's adapters carry one, else 0) from N(0, b_std) too.
    """
    shapes, out = adapter_shapes(spec), {}
    for layer in spec.adapted_layers:
        a, b = lora_a_key(layer), lora_b_key(layer)
        bound = 1.0 / shapes[a][1] ** 0.5  # kaiming_uniform with a=sqrt(5) gives 1/sqrt(fan_in)
        out[a] = (torch.rand(shapes[a], generator=generator) * 2 - 1) * bound
        out[b] = torch.randn(shapes[b], generator=generator) * b_std
    if LOG_STD_OFFSET in shapes:  # drawn only when asked: a zero offset consumes no random numbers
        shape = shapes[LOG_STD_OFFSET]
        out[LOG_STD_OFFSET] = torch.randn(shape, generator=generator) * b_std if b_std else torch.zeros(shape)
    return out


def init_adapter_reference(spec: PolicySpec, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A fresh adapter as the paper's code draws it (lora_v3/linear.py): A = 0, B ~ kaiming-uniform
    (a=sqrt(5)) over B's [out, r] (bound 1/sqrt(r)); dW = B A starts at 0 either way, but the first
    gradient step moves A (not B). The log-std offset starts at 0."""
    shapes, out = adapter_shapes(spec), {}
    for layer in spec.adapted_layers:
        a, b = lora_a_key(layer), lora_b_key(layer)
        out[a] = torch.zeros(shapes[a])
        bound = 1.0 / shapes[b][1] ** 0.5
        out[b] = (torch.rand(shapes[b], generator=generator) * 2 - 1) * bound
    if LOG_STD_OFFSET in shapes:
        out[LOG_STD_OFFSET] = torch.zeros(shapes[LOG_STD_OFFSET])
    return out
