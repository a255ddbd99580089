"""Check an exported artifact against the Engine over a recurrent rollout.

The rollout feeds the recurrent state back for `steps` steps, with resets at episode starts and at
random. Each step both sides get the same inputs, including the Engine's state from the previous
step (teacher forcing), so the check measures the artifact's error per step on the states a real
rollout visits. (Letting each side run on its own state would also measure the GRU's amplification
of float32 rounding: the Engine's own merged and unmerged modes drift apart by up to ~8.5e-6 over
20 free-running steps on a random test policy, too close to the 1e-5 tolerance to test anything.)
Compared per step: every float output (action, mean, log_std / masked logits, next state) to `tol`
absolute; for Categorical also the chosen action (another choice passes only on a within-tol tie).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorasa_serve import Engine
from lorasa_serve.distributions import dim_mask, masked_logits
from lorasa_serve import onnx_contract as contract
from lorasa_serve.onnx_backend import make_session

from .errors import VerificationError
from .observations import ObsRollout

# one step: (obs [R, w], state [R, H] | None, reset [R] | None, avail [R, A] | None) -> outputs
StepFn = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None],
                  dict[str, np.ndarray]]


@dataclass(frozen=True)
class VerifyConfig:
    tol: float = 1e-5  # max abs difference, CPU fp32 ...
    rtol: float = 0.0  # ... plus rtol * |engine value| (0: a pure absolute tolerance)
    avail_prob: float = 0.75  # Categorical: chance an action is available (one always is)


@dataclass(frozen=True)
class Rows:
    """Which (agent, env) pairs form the rows of each step, and the observation width."""

    agent_ids: list[str]  # [R]
    envs: np.ndarray  # [R] env index of each row
    width: int  # obs columns fed (the agent's obs_dim, or obs_max for the multi-agent graph)


def agent_rows(engine: Engine, agent_id: str, envs: int) -> Rows:
    return Rows([agent_id] * envs, np.arange(envs), engine.spec.agent(agent_id).obs_dim)


def mixed_rows(engine: Engine, envs: int, seed: int) -> Rows:
    """Every agent of every env, rows in a shuffled order (a mixed batch)."""
    ids = engine.spec.agent_ids
    pairs = [(a, e) for e in range(envs) for a in ids]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return Rows([pairs[i][0] for i in order], np.array([pairs[i][1] for i in order]), engine.spec.obs_max)


def engine_step(engine: Engine, rows: Rows, act_width: int, mode: str) -> StepFn:
    """The reference: Engine.forward (head, state) and Engine.act (deterministic actions)."""
    spec = engine.spec
    act_dims = torch.tensor([a.act_dim for a in spec.agents])
    dims = dim_mask(act_dims, torch.as_tensor(engine.agent_index(rows.agent_ids)), spec.act_max)  # [R, A]

    def step(obs, h, reset, avail):
        head, h_next = engine.forward(rows.agent_ids, obs, h, reset, mode=mode)
        out = engine.act(rows.agent_ids, obs, h, reset, avail, deterministic=True, mode=mode)
        res = {}
        if spec.action == "gaussian":
            res["action"] = out.actions[:, :act_width].numpy()
            res["mean"] = (head * dims)[:, :act_width].numpy()
            own = torch.stack([engine.log_std(a) for a in rows.agent_ids])  # [R, act_max]
            res["log_std"] = (own * dims)[:, :act_width].numpy()
        else:
            valid = dims & torch.as_tensor(np.pad(avail, ((0, 0), (0, spec.act_max - avail.shape[1]))))
            res["action"] = out.actions.numpy()
            res["logits"] = masked_logits(head, valid)[:, :act_width].numpy()
        if h_next is not None:
            res["state_out"] = h_next.numpy()
        return res
    return step


def onnx_step(model: bytes | Path, names: list[str], agent_index: np.ndarray | None) -> StepFn:
    """The candidate: an onnxruntime CPU session over the exported graph."""
    sess = make_session(model, "cpu")
    inputs = [i.name for i in sess.get_inputs()]

    def step(obs, h, reset, avail):
        feeds = {contract.OBS: obs, contract.STATE: h, contract.RESET: reset, contract.AVAIL: avail,
                 contract.AGENT_INDEX: agent_index}
        return dict(zip(names, sess.run(names, {k: feeds[k] for k in inputs})))  # outputs by name
    return step


def rollout_parity(name: str, candidate: StepFn, reference: StepFn, engine: Engine, rows: Rows,
                   act_width: int, rollout: ObsRollout, cfg: VerifyConfig, seed: int) -> float:
    """Run both over the rollout -> max abs diff; raises VerificationError past `cfg.tol`."""
    spec = engine.spec
    rng = np.random.default_rng(seed)
    R = len(rows.agent_ids)
    act_dims = np.array([spec.agent(a).act_dim for a in rows.agent_ids])
    h = np.zeros((R, spec.hidden), np.float32) if spec.recurrent else None
    worst = 0.0
    for t in range(rollout.steps):
        obs = np.zeros((R, rows.width), np.float32)
        for i, (a, e) in enumerate(zip(rows.agent_ids, rows.envs)):
            obs[i, :spec.agent(a).obs_dim] = rollout.obs[a][t, e]
        reset = rollout.reset[t, rows.envs] if spec.recurrent else None
        avail = None
        if spec.action == "categorical":
            avail = _avail(rng, act_dims, act_width, cfg.avail_prob) if rollout.avail is None else \
                _rollout_avail(rollout, rows, t, act_width)
        got, want = candidate(obs, h, reset, avail), reference(obs, h, reset, avail)
        for key, ref in want.items():
            diff, ok = _diff(key, got[key], ref, want.get("logits"), cfg)
            worst = max(worst, diff)
            if not ok:
                raise VerificationError(f"{name} [{rollout.source} observations]", key, diff, cfg.tol, t)
        if spec.recurrent:
            h = want["state_out"]
    return worst


def _diff(key: str, got: np.ndarray, ref: np.ndarray, logits: np.ndarray | None,
          cfg: VerifyConfig) -> tuple[float, bool]:
    """-> (max abs difference, within tolerance)."""
    if got.shape != ref.shape:
        return float("inf"), False
    if key == "action" and logits is not None:  # Categorical: a choice, not a float
        rows = np.flatnonzero(got != ref)
        if len(rows) == 0:
            return 0.0, True
        gap = float((logits[rows, ref[rows]] - logits[rows, got[rows]]).max())  # ref is the argmax
        return gap, gap <= cfg.tol
    ref64 = ref.astype(np.float64)
    err = np.abs(got.astype(np.float64) - ref64)
    scale = np.where(ref == np.finfo(np.float32).min, 0.0, np.abs(ref64))  # no slack for masked logits
    return float(err.max(initial=0.0)), bool((err <= cfg.tol + cfg.rtol * scale).all())


def _rollout_avail(rollout: ObsRollout, rows: Rows, t: int, width: int) -> np.ndarray:
    """The environment's own masks for step t as [R, width] bool."""
    avail = np.zeros((len(rows.agent_ids), width), bool)
    for i, (a, e) in enumerate(zip(rows.agent_ids, rows.envs)):
        m = rollout.avail[a][t, e]
        avail[i, :len(m)] = m
    return avail


def _avail(rng: np.random.Generator, act_dims: np.ndarray, width: int, prob: float) -> np.ndarray:
    """[R, width] bool, at least one available action within each row's act_dim."""
    avail = rng.random((len(act_dims), width)) < prob
    avail[np.arange(len(act_dims)), rng.integers(0, act_dims)] = True
    return avail
