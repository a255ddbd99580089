"""Bring a policy trained by the paper's code (ZBN111/ICML2025_LoRASA, `LoRA_R_Actor`) here: its actor's
saved state dict -> a policy directory of ours (backbone + one adapter per agent), or a one-line refusal.

    lorasa-import-reference actor.pt --agents agent_0:17:3,agent_1:17:3 --lora-alpha 8 --out my_policy

The checkpoint is read with `torch.load(weights_only=True)`: tensors only, never unpickled code. Its
layout (module names of `LoRA_R_Actor`, each Linear an `MA_Linear` with per-agent `lora_A_lst.<i>` /
`lora_B_lst.<i>` / `lora_bias_lst.<i>`) maps onto ours:

    base.feature_norm                 -> ln_in          rnn.rnn.x_layer / h_layer   -> gru.x / gru.h
    base.mlp.fc1.0 / fc1.2            -> mlp.0 / .ln    rnn.norm                    -> gru.ln
    base.mlp.fc2.<j>.0 / fc2.<j>.2    -> mlp.<j+1> / .ln  rnn.fc.0.0 / rnn.fc.0.2   -> post / post.ln
    act.action_out.fc_mean (Gaussian) or act.action_out.linear (Categorical)       -> head
    act.action_out.logstd._bias [A, 1] -> log_std;  ..._lora_bias.lora_A_lst.<i> [A, 1] -> log_std_offset

A low-rank delta (B A times lora_alpha / r) keeps its factors (B rescaled to our alpha); a full-rank one
(the reference's `r >= min(shape)` case, e.g. a head with fewer actions than r) is factored exactly by an
SVD when its rank fits ours. Refused, one line each: per-agent biases that are not zero (our adapters
have none: every checkpoint trained with the reference's argparse default `--train_lora_bias 1`; its
YAML configs set 0, which leaves them zero), a full-rank delta of higher rank than ours, layers or keys we cannot place (a transformer or
MLP-only actor, `layer_after_N` != 1, more than one GRU layer), a sigmoid-std / tanh-squashed Gaussian
(`LoRA_DiagGaussian2/3`: ours is N(mean, exp(log_std))), sizes that disagree with `--agents`.
"""
from __future__ import annotations

import io
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lorasa_serve import AgentSpec, LoraSpec, PolicySpec, save_policy
from lorasa_serve.adapter_layout import LOG_STD_OFFSET, lora_a_key, lora_b_key, scaling
from lorasa_serve.cli import ArgumentParser, UsageError, run_cli
from lorasa_serve.errors import NotRegularFileError
from lorasa_serve.files import read_file

LINEARS = {"base.mlp.fc1.0": "mlp.0", "rnn.rnn.x_layer": "gru.x", "rnn.rnn.h_layer": "gru.h",
           "rnn.fc.0.0": "post"}
NORMS = {"base.feature_norm": "ln_in", "base.mlp.fc1.2": "mlp.0.ln", "rnn.norm": "gru.ln", "rnn.fc.0.2": "post.ln"}
HEADS = {"act.action_out.fc_mean": "gaussian", "act.action_out.linear": "categorical"}
LOG_STD = "act.action_out.logstd._bias"
LOG_STD_LORA = "act.action_out.logstd._lora_bias"
MAX_CHECKPOINT_BYTES = 4 << 30  # an actor's state dict is read only if it is at most this big


class ImportRefused(UsageError):
    """The checkpoint holds something our format cannot represent (the message says what)."""


@dataclass(frozen=True)
class ImportConfig:
    checkpoint: Path  # the reference's saved actor state dict (actor.pt)
    agents: tuple[AgentSpec, ...]  # ids and true obs / act sizes, in the reference's agent order
    lora_alpha: float = 8.0  # the reference run's --lora_alpha (its scaling is lora_alpha / r)
    rank: int | None = None  # our adapters' rank (None: the checkpoint's low-rank r, else 8)


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """The checkpoint's tensors. It is read through `files.read_file` first (a regular file of at most
    MAX_CHECKPOINT_BYTES: a FIFO, a device or a broken symlink is a typed error, never a hang)."""
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such file; pass the reference's saved actor (actor.pt)")
    try:
        data = read_file(path, MAX_CHECKPOINT_BYTES)
    except NotRegularFileError as e:
        raise UsageError(f"{e}; pass the reference's saved actor (actor.pt)") from None
    _check_crcs(path, data)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a corrupt file: weights_only refuses it
        raise ImportRefused(f"{path}: not a tensors-only state dict ({type(e).__name__}): export the actor's "
                            "state_dict() with torch.save") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ImportRefused(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v.detach().float() for k, v in sd.items()}


def _check_crcs(path: Path, data: bytes) -> None:
    """torch.save's zip format records a CRC-32 per record, which torch.load does not check: a flipped
    byte in a tensor would change weights silently. Check them (ImportRefused on a mismatch)."""
    if not data.startswith(b"PK\x03\x04"):  # the legacy format: no checksums to check
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip() if any(i.CRC for i in z.infolist()) else None  # (CRCs off: all zero)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise ImportRefused(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ImportRefused(f"{path}: record {bad} fails its CRC-32 check: the file is corrupted")


def convert(sd: dict[str, Tensor], cfg: ImportConfig) -> tuple[PolicySpec, dict, dict]:
    """-> (spec, backbone, adapters) of our format; ImportRefused for what it cannot hold."""
    linears = dict(LINEARS)
    n_hidden = sorted({int(m.group(1)) for k in sd if (m := re.match(r"base\.mlp\.fc2\.(\d+)\.0\.weight$", k))})
    for j in n_hidden:
        linears[f"base.mlp.fc2.{j}.0"] = f"mlp.{j + 1}"
    norms = {**NORMS, **{f"base.mlp.fc2.{j}.2": f"mlp.{j + 1}.ln" for j in n_hidden}}
    head = [p for p in HEADS if f"{p}.weight" in sd]
    if len(head) != 1:
        why = "a sigmoid-std Gaussian (LoRA_DiagGaussian2/3: tanh-squashed, std = 0.5 sigmoid)" \
            if "act.action_out.log_std" in sd else "no action head"
        raise ImportRefused(f"the checkpoint has {why}: our head is N(mean, exp(log_std)) or Categorical logits")
    linears[head[0]] = "head"
    action = HEADS[head[0]]
    _check_known(sd, [*linears, *norms], action)
    N, H = len(cfg.agents), sd["rnn.norm.weight"].shape[0] if "rnn.norm.weight" in sd else 0
    width = sd["base.feature_norm.weight"].shape[0]
    spec = _spec(cfg, width, H, 1 + len(n_hidden), action, sd, linears)
    backbone = {f"{ours}.{p}": sd[f"{ref}.{p}"] for ref, ours in {**linears, **norms}.items() for p in ("weight", "bias")}
    if action == "gaussian":
        backbone["log_std"] = sd[LOG_STD].reshape(-1)
    _check_shapes(spec, backbone)
    adapters = {a.agent_id: _adapter(sd, spec, linears, i, cfg) for i, a in enumerate(cfg.agents)}
    return spec, backbone, adapters


def _spec(cfg: ImportConfig, width: int, H: int, depth: int, action: str, sd: dict, linears: dict) -> PolicySpec:
    if not H:
        raise ImportRefused("the checkpoint has no GRU (rnn.*): only the recurrent LoRA_R_Actor is supported")
    obs_max, N = max(a.obs_dim for a in cfg.agents), len(cfg.agents)
    onehot = width - obs_max
    if onehot not in (0, N):
        raise ImportRefused(f"the actor's input is {width} wide, --agents say obs_max {obs_max}: expected "
                            f"{obs_max} (no agent id) or {obs_max + N} (obs_max + a one-hot of the {N} agents)")
    lows = [sd[f"{ref}.lora_B_lst.0"].shape[1] for ref in linears if f"{ref}.lora_B_lst.0" in sd]
    rank = cfg.rank or (lows[0] if lows else 8)
    adapted = tuple(ours for ref, ours in linears.items() if f"{ref}.lora_A_lst.0" in sd)
    if not adapted:
        raise ImportRefused("the checkpoint has no per-agent LoRA (lora_A_lst): import it as a PS policy instead")
    offset = action == "gaussian" and f"{LOG_STD_LORA}.lora_A_lst.0" in sd
    return PolicySpec(agents=cfg.agents, hidden=H, mlp_depth=depth, action=action, agent_onehot=onehot,
                      lora=LoraSpec(rank, float(rank), None if len(adapted) == len(linears) else adapted,
                                    log_std_offset=offset))


def _check_known(sd: dict, modules: list[str], action: str) -> None:
    allowed = re.compile("^(" + "|".join(re.escape(m) for m in modules + ([LOG_STD, LOG_STD_LORA] if action == "gaussian" else []))
                         + r")(\.|$)")
    unknown = sorted(k for k in sd if not allowed.match(k))
    if unknown:
        raise ImportRefused(f"{len(unknown)} checkpoint tensors have no place in our actor (first: {unknown[0]}): "
                            "only LoRA_R_Actor with an MLP base, one GRU layer and layer_after_N = 1 is supported")


def _check_shapes(spec: PolicySpec, backbone: dict) -> None:
    want = spec.backbone_shapes()
    for k, shape in want.items():
        if k not in backbone or tuple(backbone[k].shape) != shape:
            got = None if k not in backbone else list(backbone[k].shape)
            raise ImportRefused(f"{k}: the checkpoint's shape {got} is not {list(shape)} (check --agents' sizes)")


def _adapter(sd: dict, spec: PolicySpec, linears: dict, i: int, cfg: ImportConfig) -> dict[str, Tensor]:
    """Agent i's adapter in our layout: dW_i = (alpha/r) B A on each adapted layer (+ log-std offset)."""
    r, out = spec.lora.rank, {}
    for ref, ours in linears.items():
        if ours not in spec.adapted_layers:
            continue
        bias = sd.get(f"{ref}.lora_bias_lst.{i}")
        if bias is not None and bool(bias.abs().max() > 0):
            raise ImportRefused(f"{ref}: agent {i} has a per-agent bias (lora_bias_lst): our adapters have none; "
                                "train with the reference's --train_lora_bias 0 (its argparse default is 1, "
                                "its onpolicy/config/*.yaml set 0)")
        out[lora_a_key(ours)], out[lora_b_key(ours)] = _factors(sd, ref, i, r, cfg.lora_alpha, scaling(spec.lora))
    if spec.lora.log_std_offset:  # full rank [A, 1] (r >= min(shape) = 1 in the reference): scaling 1
        out[LOG_STD_OFFSET] = sd[f"{LOG_STD_LORA}.lora_A_lst.{i}"].reshape(-1)
    return out


def _factors(sd: dict, ref: str, i: int, r: int, ref_alpha: float, scale: float) -> tuple[Tensor, Tensor]:
    """-> (A [r, in], B [out, r]) with scale * B A equal to the reference's delta of agent i."""
    a = sd[f"{ref}.lora_A_lst.{i}"]
    b = sd.get(f"{ref}.lora_B_lst.{i}")
    if b is not None:  # low rank: delta = (lora_alpha / r_ref) B A; a higher rank of ours: zero-padded
        k = b.shape[1]
        if k > r:
            raise ImportRefused(f"{ref}: rank {k} adapters do not fit rank {r}: pass --rank {k} or more")
        return F.pad(a, (0, 0, 0, r - k)), F.pad(b * (ref_alpha / k) / scale, (0, r - k))
    delta = a  # full rank (r_ref >= min(shape)): delta = A [out, in] (scaling lora_alpha / r = 1)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # delta = u diag(s) vh
    k = int((s > s.max() * 1e-7).sum()) if s.numel() else 0
    if k > r:
        raise ImportRefused(f"{ref}: agent {i}'s full-rank delta has rank {k} > {r}: pass --rank {k} or more")
    A = torch.zeros(r, delta.shape[1], dtype=torch.float64)
    B = torch.zeros(delta.shape[0], r, dtype=torch.float64)
    A[:k], B[:, :k] = vh[:k], u[:, :k] * s[:k]
    return A.float(), (B / scale).float()


# --- CLI ----------------------------------------------------------------------------------------------
def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="lorasa-import-reference", description=__doc__)
    ap.add_argument("checkpoint", type=Path, help="the reference's saved actor state dict (actor.pt)")
    ap.add_argument("--agents", required=True,
                    help="id:obs_dim:act_dim per agent, comma-separated, in the reference's agent order")
    ap.add_argument("--lora-alpha", type=float, default=8.0, help="the reference run's --lora_alpha")
    ap.add_argument("--rank", type=int, default=None, help="our adapters' rank (default: the checkpoint's r)")
    ap.add_argument("--out", type=Path, required=True, help="the policy directory to write (must not exist)")
    return ap


def parse_args(argv: list[str] | None) -> tuple[ImportConfig, Path]:
    a = parser().parse_args(argv)
    agents = []
    for part in a.agents.split(","):
        m = re.fullmatch(r"([A-Za-z0-9._-]+):(\d+):(\d+)", part.strip())
        if not m:
            raise UsageError(f"--agents {part!r}: write id:obs_dim:act_dim, e.g. agent_0:17:3")
        agents.append(AgentSpec(m.group(1), int(m.group(2)), int(m.group(3))))
    if a.out.exists():
        raise UsageError(f"--out {a.out} exists: pass a new directory")
    if not a.lora_alpha > 0 or (a.rank is not None and a.rank < 1):
        raise UsageError("--lora-alpha must be > 0 and --rank >= 1")
    return ImportConfig(a.checkpoint, tuple(agents), a.lora_alpha, a.rank), a.out


def run(argv: list[str] | None) -> int:
    cfg, out = parse_args(argv)
    spec, backbone, adapters = convert(load_checkpoint(cfg.checkpoint), cfg)
    spec = save_policy(out, spec, backbone, adapters)
    print(f"wrote {out}: {len(spec.agents)} agents, rank {spec.lora.rank}, layers {spec.adapted_layers}"
          + (", per-agent log-std" if spec.lora.log_std_offset else "")
          + (f", agent one-hot ({spec.agent_onehot})" if spec.agent_onehot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("lorasa-import-reference", run, argv)


if __name__ == "__main__":
    sys.exit(main())
