"""Rollouts on Ray (`--env.backend ray --env.workers K`): K `RolloutWorker` actors spread over the cluster's
nodes, worker w stepping envs [b_w, b_{w+1}) of the vector env (the split `SubprocVecEnv` uses) and acting
with its own CPU copy of the actor. Per update the learner puts ONE object in the object store (Ray moves it
once per node): the actor's trainable tensors and the sampling state; the frozen part (phase 2: the PS
backbone) goes out once, when the actor changes. Phase 1 (PS) so sends the whole actor per update, phase 2
only the per-agent adapters (LoRA A, B and log-std offsets): `traffic` counts the bytes.

Each worker returns its envs' `mappo.Segment` (observations, actions, log-probs, GRU states, rewards, ...);
the learner concatenates them (`concat_segments`) and runs the critic (`finish_rollout`), so the learner
code is the one the local backend runs. Exactness (`ray_exact`, the default): a worker acts at the whole
batch's shape [N, E, ...], its rows in place and zeros elsewhere, starting from the learner's generator
state, so it draws the very noise and computes the very floats the local backend does (a forward over
fewer rows is not bit-identical on CPU); the learner then takes the generator state the workers end in.
Same seed, same number of envs: the same trajectories as `--env.backend local`, for any K.

A worker that dies (its process or node) fails the update: a `WorkerLostError` naming it; nothing of that
update is written, the run's last checkpoint stays whole (`lorasa-train --resume OUT` continues it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lorasa_serve import PolicySpec

from .actor import Actor
from .envs import EnvConfig, EnvInfo, make_single
from .envs.vector import EnvFactory, SerialVecEnv
from .errors import WorkerLostError
from .mappo import Cursor, Policy, Segment, act_segment, concat_segments, finish_rollout
from .ray_support import connect


def split(n_envs: int, workers: int) -> list[int]:
    """Start index of each worker's envs, plus n_envs at the end (SubprocVecEnv's split)."""
    workers = max(1, min(workers, n_envs))
    sizes = [n_envs // workers + (w < n_envs % workers) for w in range(workers)]
    return [int(x) for x in np.cumsum([0] + sizes)]


def nbytes(tree) -> int:
    """Bytes of the arrays / tensors in a (nested) dict or list."""
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    return int(tree.nbytes) if isinstance(tree, np.ndarray) else 0


def _numpy(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def _pad(x: Tensor, lo: int, E: int) -> Tensor:
    """[N, n, ...] -> [N, E, ...]: rows lo .. lo+n-1, zeros elsewhere."""
    out = x.new_zeros((x.shape[0], E, *x.shape[2:]))
    out[:, lo:lo + x.shape[1]] = x
    return out


class RolloutWorker:
    """One Ray actor: envs [lo, hi) of an E-env vector env, its cursor, and a CPU copy of the actor."""

    def __init__(self, cfg: EnvConfig, lo: int, hi: int, n_envs: int, factory: EnvFactory = make_single,
                 threads: int = 1):
        torch.set_num_threads(threads)  # the learner's: a GEMM's floats depend on its thread count
        self.venv = SerialVecEnv(cfg, factory, hi - lo, lo)
        self.lo, self.hi, self.E, self.exact = lo, hi, n_envs, cfg.ray_exact
        self.base: dict | None = None
        self.cur: Cursor | None = None

    def info(self) -> EnvInfo:
        return self.venv.info

    def start(self, seed: int, hidden: int | None) -> None:
        """Fresh episodes: env e (global index) is reset with seed + e, as the local vector envs do."""
        n, N = self.hi - self.lo, self.venv.info.n_agents
        h0 = None if hidden is None else torch.zeros(N, n, hidden)
        self.cur = Cursor(self.venv.reset(seed + self.lo), h0, torch.ones(n, dtype=torch.bool))

    def set_base(self, base: dict) -> None:
        """The actor's fixed part: {spec, kind, groups, frozen: name -> array}."""
        self.base = {**base, "spec": PolicySpec.from_dict(base["spec"]),
                     "frozen": {k: torch.from_numpy(v.copy()) for k, v in base["frozen"].items()}}

    def collect(self, weights: dict, T: int) -> dict:
        """T steps with the actor's `weights` {trainable, rng | seed} -> {segment, rng (exact mode)}."""
        b = self.base
        trainable = {k: torch.from_numpy(v.copy()) for k, v in weights["trainable"].items()}
        policy = Policy.build(Actor(b["spec"], b["kind"], trainable, b["frozen"], tuple(b["groups"])),
                              self.venv.info)
        g = torch.Generator()
        if self.exact:
            g.set_state(torch.from_numpy(weights["rng"].copy()))
            act = self._padded_act(policy, g)
        else:
            g.manual_seed(int(weights["seed"]) + self.lo)
            act = None
        seg, self.cur = act_segment(self.venv, policy, self.cur, T, g, act)
        return {"segment": seg, "rng": g.get_state().numpy() if self.exact else None}

    def _padded_act(self, policy: Policy, g: torch.Generator):
        lo, hi, E = self.lo, self.hi, self.E

        def act(obs, h, reset, avail):  # [N, n, ...] -> the rows of the [N, E, ...] forward
            a, logp, h_next = policy.act(_pad(obs, lo, E), None if h is None else _pad(h, lo, E),
                                         _pad(reset, lo, E), _pad(avail, lo, E), False, g)
            return a[:, lo:hi], logp[:, lo:hi], None if h_next is None else h_next[:, lo:hi]
        return act

    def close(self) -> None:
        self.venv.close()


class RayRollouts:
    """The learner's side: starts the workers, ships weights once per update, gathers the segments."""

    def __init__(self, cfg: EnvConfig, factory: EnvFactory = make_single):
        self.ray = ray = connect(cfg.ray_address)
        self.bounds = split(cfg.n_envs, max(1, cfg.workers))
        self.n_envs, self.exact = cfg.n_envs, cfg.ray_exact
        Worker = ray.remote(num_cpus=1, max_restarts=0, scheduling_strategy="SPREAD")(RolloutWorker)
        threads = torch.get_num_threads()
        self.workers = [Worker.remote(cfg, lo, hi, cfg.n_envs, factory, threads)
                        for lo, hi in zip(self.bounds, self.bounds[1:])]
        self.info: EnvInfo = self._get([w.info.remote() for w in self.workers], "start")[0]
        self._actor: Actor | None = None  # the actor whose fixed part the workers hold
        self.traffic: dict[str, dict[str, int]] = {}  # actor kind -> bytes: weights_per_update, base_once, ...

    def start(self, seed: int, h0: Tensor | None) -> Cursor:
        hidden = None if h0 is None else int(h0.shape[-1])
        self._get([w.start.remote(seed, hidden) for w in self.workers], "reset")
        return Cursor(None, None, None)  # the cursors live on the workers

    def collect(self, policy, critic, vnorm, cur, T, gamma, g):
        actor = policy.actor
        if actor is not self._actor:
            self._send_base(actor)
        weights = {"trainable": _numpy(actor.trainable)}
        if self.exact:
            weights["rng"] = g.get_state().numpy()
        else:
            weights["seed"] = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        self.traffic[actor.kind]["weights_per_update"] = nbytes(weights)
        ref = self.ray.put(weights)
        outs = self._get([w.collect.remote(ref, T) for w in self.workers], "the rollout")
        if self.exact:
            g.set_state(torch.from_numpy(outs[0]["rng"].copy()))
        segs: list[Segment] = [o["segment"] for o in outs]
        self.traffic[actor.kind]["rollout_per_update"] = nbytes([s.data for s in segs])
        ro, episodes = finish_rollout(concat_segments(segs, self.bounds[:-1]), critic, vnorm, gamma)
        return ro, cur, episodes

    def _send_base(self, actor: Actor) -> None:
        base = {"spec": actor.spec.to_dict(), "kind": actor.kind, "groups": list(actor.groups),
                "frozen": _numpy(actor.frozen)}
        ref = self.ray.put(base)
        self._get([w.set_base.remote(ref) for w in self.workers], "receiving the actor")
        self._actor = actor
        self.traffic[actor.kind] = {"base_once": nbytes(base["frozen"])}

    def _get(self, refs: list, what: str) -> list:
        ray, out = self.ray, []
        for w, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                self.close()
                lo, hi = self.bounds[w], self.bounds[w + 1]
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WorkerLostError(f"Ray rollout worker {w} (envs {lo}..{hi - 1}) died during {what} ({reason}); "
                                      "nothing of this update was kept and the run's last checkpoint is whole: "
                                      "continue it with lorasa-train --resume OUT") from None
            except ray.exceptions.RayTaskError as e:  # an error inside the worker (e.g. the env's)
                self.close()
                raise e.as_instanceof_cause() from None
        return out

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            self.ray.kill(w)
        self.workers = []
