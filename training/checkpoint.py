"""Training state beside a policy directory, safetensors + JSON only (no pickle), resumable:

    <out>/train_state/state.json         config, counters, actor kind, value normaliser
    <out>/train_state/actor.safetensors  the actor's trainable (and frozen) tensors
    <out>/train_state/critic.safetensors critic weights
    <out>/train_state/optim.safetensors  Adam moments of actor and critic, the sampling RNG state
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from lorasa_serve.artifacts import atomic_write
from lorasa_serve.errors import CorruptFileError
from lorasa_serve.files import read_file

STATE_DIR = "train_state"
MAX_META_BYTES = 64 << 20  # state.json is read only if it is at most this big
MAX_TENSOR_BYTES = 16 << 30  # likewise each .safetensors file (read whole: regular files only)


@dataclass
class Counters:
    env_steps: int = 0
    updates: int = 0
    phase_switch_step: int = -1  # env step at which LoRA training started (-1: not in this run)
    wall_s: float = 0.0  # training wall time so far (a resumed run continues from it)


def _opt_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{idx}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    sd["state"] = state
    opt.load_state_dict(sd)


def save(out: Path, meta: dict, actor, critic: torch.nn.Module, actor_opt, critic_opt,
         g: torch.Generator) -> None:
    d = Path(out) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"trainable.{k}": v.detach().contiguous() for k, v in actor.trainable.items()}
    tensors.update({f"frozen.{k}": v.contiguous() for k, v in actor.frozen.items()})
    save_file(tensors, str(d / "actor.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in critic.state_dict().items()},
              str(d / "critic.safetensors"))
    opt = {**_opt_tensors(actor_opt, "actor"), **_opt_tensors(critic_opt, "critic"),
           "rng.state": g.get_state()}
    save_file(opt, str(d / "optim.safetensors"))
    atomic_write(d / "state.json", json.dumps(meta, indent=2).encode())  # last: marks a whole checkpoint


def load_meta(out: Path) -> dict:
    """state.json: FileNotFoundError when there is none; a typed CorruptFileError (a LorasaError) when
    it is not a regular file (FIFO, device, broken symlink), oversized, or not a JSON object."""
    path = Path(out) / STATE_DIR / "state.json"
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no checkpoint to resume: {path} is missing")
    try:
        meta = json.loads(read_file(path, MAX_META_BYTES))
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(path, f"not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(path, "not a JSON object")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file of the checkpoint, read through `files.read_file` (typed errors)."""
    try:
        return load(read_file(path, MAX_TENSOR_BYTES))
    except SafetensorError as e:
        raise CorruptFileError(path, f"not a safetensors file: {e}") from None


def load_actor_tensors(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    t = _load_tensors(Path(out) / STATE_DIR / "actor.safetensors")
    trainable = {k[len("trainable."):]: v for k, v in t.items() if k.startswith("trainable.")}
    frozen = {k[len("frozen."):]: v for k, v in t.items() if k.startswith("frozen.")}
    return trainable, frozen


def load_critic(out: Path, critic: torch.nn.Module) -> bool:
    path = Path(out) / STATE_DIR / "critic.safetensors"
    if not os.path.lexists(path):
        return False
    critic.load_state_dict(_load_tensors(path))
    return True


def load_optimizers(out: Path, actor_opt, critic_opt, g: torch.Generator) -> None:
    t = _load_tensors(Path(out) / STATE_DIR / "optim.safetensors")
    _load_opt(actor_opt, t, "actor")
    _load_opt(critic_opt, t, "critic")
    g.set_state(t["rng.state"])
