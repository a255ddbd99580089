"""The training loop: phases (PS -> LoRA), periodic evaluation, metrics, checkpoints, the policy dir.

Output directory (`cfg.out`):
    policy.json, backbone.safetensors, adapters/   the servable policy (PS or PS+LoRA; Engine.from_dir)
    env.json                                       which task it was trained on (read by lorasa-eval)
    phase1/                                        lorasa runs: the PS policy at the switch step
    train_state/                                   critic, optimisers, counters (resume / phase 2)
    metrics.csv, tb/, learning_curve.png
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorasa_serve import LoraSpec, PolicySpec, load_policy, save_policy
from lorasa_serve.artifacts import atomic_write

from . import checkpoint
from .actor import Actor
from .config import TrainConfig
from .envs import EnvConfig, EnvInfo, make_vec_env
from .episodes import EpisodeStats, run_episodes
from .mappo import Critic, Cursor, Policy, ValueNorm, collect, env_actions, grouped, ppo_update

ENV_FILE = "env.json"
CSV_FIELDS = ["env_steps", "phase", "updates", "wall_s", "sps", "rollout_s", "update_s",
              "train_return", "train_win", "eval_return", "eval_std", "eval_win", "policy_loss",
              "value_loss", "entropy", "approx_kl", "clip_frac"]


def build_spec(info: EnvInfo, cfg: TrainConfig) -> PolicySpec:
    m, lo = cfg.model, cfg.lora
    return PolicySpec(agents=info.agent_specs(), hidden=m.hidden, mlp_depth=m.mlp_depth,
                      recurrent=m.recurrent, action=info.action,
                      lora=LoraSpec(lo.rank, lo.alpha, None if lo.layers is None else tuple(lo.layers)))


def torch_act_fn(policy: Policy, deterministic: bool = True, g: torch.Generator | None = None):
    """An `episodes.ActFn` over the training actor (state: [N, E, H] tensor)."""
    N, H = policy.info.n_agents, policy.actor.spec.hidden

    def act(obs, avail, state, reset):
        with torch.no_grad():
            o = grouped(obs)
            if state is None and policy.actor.spec.recurrent:
                state = torch.zeros(N, o.shape[1], H)
            actions, _, h = policy.act(o, state, torch.from_numpy(reset).expand(N, -1), grouped(avail),
                                       deterministic, g)
        return env_actions(actions), h

    return act


def write_env_json(directory: Path, cfg: TrainConfig, kind: str, counters: checkpoint.Counters) -> None:
    meta = {"env": cfg.env.env_block(), "trained_by": "lorasa-train", "actor": kind, "mode": cfg.mode,
            "env_steps": counters.env_steps, "seed": cfg.seed}
    atomic_write(Path(directory) / ENV_FILE, json.dumps(meta, indent=2).encode())


def read_env_json(directory: Path) -> EnvConfig:
    path = Path(directory) / ENV_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: lorasa-eval needs to know the policy's environment "
                                "(policies written by lorasa-train have it)")
    block = json.loads(path.read_text())["env"]
    return EnvConfig(**block)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.venv = make_vec_env(cfg.env)
        self.info = self.venv.info
        self.critic = Critic(self.info.state_dim, cfg.ppo.critic_hidden)
        self.vnorm = ValueNorm()
        self.counters = checkpoint.Counters()
        self.actor = self._resume() if resume else self._fresh_actor()
        self.actor_opt = self._actor_opt()
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.ppo.critic_lr, eps=1e-5)
        if resume:
            checkpoint.load_optimizers(self.out, self.actor_opt, self.critic_opt, self.g)
        self.policy = Policy.build(self.actor, self.info)
        self._eval_env = None
        self._tb = None

    # --- set-up -------------------------------------------------------------------------------
    def _fresh_actor(self) -> Actor:
        cfg = self.cfg
        spec = build_spec(self.info, cfg)
        if cfg.mode == "nps":
            return Actor.new_nps(spec, self.g, cfg.model.init_log_std)
        if cfg.mode == "lorasa" and cfg.init_from:
            return self._phase2_from(Path(cfg.init_from))
        return Actor.new_ps(spec, self.g, cfg.model.init_log_std)

    def _phase2_from(self, src: Path) -> Actor:
        """Phase 2 from a phase-1 (PS) policy dir: frozen backbone, fresh adapters; its critic if saved."""
        spec0, backbone, adapters = load_policy(src)
        if adapters:
            raise ValueError(f"{src} already has adapters: init_from needs a phase-1 (PS) policy directory")
        if tuple(spec0.agents) != self.info.agent_specs():
            raise ValueError(f"{src} was trained for agents {spec0.agents}, this env has "
                             f"{self.info.agent_specs()}")
        lo = self.cfg.lora
        spec = replace(spec0, lora=LoraSpec(lo.rank, lo.alpha, None if lo.layers is None else tuple(lo.layers)))
        if checkpoint.load_critic(src, self.critic):
            meta = checkpoint.load_meta(src)
            self.vnorm.load(meta["value_norm"])
            self.counters.env_steps = int(meta["counters"]["env_steps"])
        self.counters.phase_switch_step = self.counters.env_steps
        return Actor.lora_from_backbone(spec, backbone, self.g)

    def _resume(self) -> Actor:
        meta = checkpoint.load_meta(self.out)
        self.counters = checkpoint.Counters(**meta["counters"])
        self.vnorm.load(meta["value_norm"])
        checkpoint.load_critic(self.out, self.critic)
        trainable, frozen = checkpoint.load_actor_tensors(self.out)
        spec = PolicySpec.from_dict(meta["spec"])
        return Actor(spec, meta["actor_kind"], trainable, frozen)

    def _actor_opt(self) -> torch.optim.Optimizer:
        lr = self.cfg.lora.lr if self.actor.kind == "lora" else self.cfg.ppo.lr
        return torch.optim.Adam(list(self.actor.trainable.values()), lr=lr, eps=1e-5)

    def _switch_to_lora(self) -> None:
        """Phase 1 -> 2: save the PS policy to phase1/, freeze it, train fresh per-agent adapters."""
        self.save_policy(self.out / "phase1")
        self.actor = Actor.lora_from_backbone(self.actor.spec, self.actor.backbone(), self.g)
        self.actor_opt = self._actor_opt()
        self.policy = Policy.build(self.actor, self.info)
        self.counters.phase_switch_step = self.counters.env_steps

    # --- outputs ------------------------------------------------------------------------------
    def save_policy(self, directory: Path) -> None:
        directory = Path(directory)
        if self.actor.servable():
            save_policy(directory, self.actor.spec, self.actor.backbone(), self.actor.adapters())
        write_env_json(directory, self.cfg, self.actor.kind, self.counters)
        self.save_train_state(directory)

    def save_train_state(self, directory: Path) -> None:
        meta = {"config": self.cfg.to_dict(), "counters": self.counters.__dict__,
                "actor_kind": self.actor.kind, "spec": self.actor.spec.to_dict(),
                "value_norm": self.vnorm.to_dict()}
        checkpoint.save(directory, meta, self.actor, self.critic, self.actor_opt, self.critic_opt, self.g)

    def evaluate(self) -> EpisodeStats:
        cfg = self.cfg
        if self._eval_env is None:
            self._eval_env = make_vec_env(cfg.env, n_envs=cfg.eval_episodes, workers=0)
        return run_episodes(self._eval_env, torch_act_fn(self.policy), seed=cfg.seed + 10_000)

    # --- the loop -----------------------------------------------------------------------------
    def train(self, progress: bool = True) -> dict:
        cfg, c = self.cfg, self.counters
        if cfg.ppo.rollout % cfg.ppo.chunk:
            raise ValueError(f"ppo.rollout ({cfg.ppo.rollout}) must be a multiple of ppo.chunk ({cfg.ppo.chunk})")
        writer = _CsvLog(self.out / "metrics.csv")
        self._open_tb()
        cur, recent, last = self._start_cursor(), [], None
        next_eval = _next_multiple(c.env_steps, cfg.eval_every)
        next_save = _next_multiple(c.env_steps, cfg.save_every)
        bar = tqdm(total=cfg.total_steps, initial=c.env_steps, unit="step", disable=not progress,
                   desc=f"{cfg.mode} {self.info.name}", dynamic_ncols=True)
        t_start = time.perf_counter()
        while c.env_steps < cfg.total_steps:
            if cfg.mode == "lorasa" and self.actor.kind == "ps" and c.env_steps >= cfg.switch_step:
                self._switch_to_lora()
            row, cur, recent = self._iteration(cur, recent)
            row["wall_s"] = round(time.perf_counter() - t_start, 2)
            due = cfg.eval_every and c.env_steps >= next_eval or c.env_steps >= cfg.total_steps
            if due and cfg.eval_episodes > 0:
                last = self.evaluate()
                row.update(eval_return=last.mean_return, eval_std=last.std_return, eval_win=last.win_rate)
                next_eval = _next_multiple(c.env_steps, cfg.eval_every)
            writer.write(row)
            self._tb_write(row)
            if cfg.save_every and c.env_steps >= next_save:
                self.save_policy(self.out)
                next_save = _next_multiple(c.env_steps, cfg.save_every)
            bar.update(cfg.ppo.rollout * self.venv.n_envs)
            bar.set_postfix(ret=f"{row['train_return']:.1f}", sps=f"{row['sps']:.0f}", phase=self.actor.kind)
        bar.close()
        writer.close()
        self._finish()
        return {"env_steps": c.env_steps, "final_eval": None if last is None else last.to_dict(),
                "trainable_params": self.actor.n_trainable()}

    def _start_cursor(self) -> Cursor:
        """Fresh episodes in every env (a resumed run restarts its episodes), zero GRU states."""
        E, spec = self.venv.n_envs, self.actor.spec
        step = self.venv.reset(self.cfg.seed + self.counters.updates * 7919)
        h0 = torch.zeros(self.info.n_agents, E, spec.hidden) if spec.recurrent else None
        return Cursor(step, h0, torch.ones(E, dtype=torch.bool))

    def _iteration(self, cur: Cursor, recent: list) -> tuple[dict, Cursor, list]:
        """One rollout + one PPO update -> (metrics row, new cursor, the last 20 finished episodes)."""
        cfg, c = self.cfg, self.counters
        T, E = cfg.ppo.rollout, self.venv.n_envs
        t0 = time.perf_counter()
        ro, cur, eps = collect(self.venv, self.policy, self.critic, self.vnorm, cur, T, cfg.ppo.gamma, self.g)
        t1 = time.perf_counter()
        stats = ppo_update(self.policy, self.critic, self.vnorm, ro, cfg.ppo, self.actor_opt,
                           self.critic_opt, self.g)
        t2 = time.perf_counter()
        c.env_steps += T * E
        c.updates += 1
        recent = (recent + eps)[-20:]
        row = {"env_steps": c.env_steps, "phase": self.actor.kind, "updates": c.updates,
               "sps": round(T * E / (t2 - t0), 1), "rollout_s": round(t1 - t0, 4),
               "update_s": round(t2 - t1, 4), "train_return": _mean([r for r, _, _ in recent]),
               "train_win": _mean([w for _, _, w in recent]), **stats.__dict__}
        return row, cur, recent

    def _finish(self) -> None:
        """Final policy directory + train_state, learning-curve PNG, close the envs."""
        from .plots import plot_learning_curves
        self.save_policy(self.out)
        self._close_tb()
        plot_learning_curves({self.cfg.mode: self.out / "metrics.csv"}, self.out / "learning_curve.png",
                             title=f"{self.info.name}: {self.cfg.mode}")
        self.close()

    def close(self) -> None:
        self.venv.close()
        if self._eval_env is not None:
            self._eval_env.close()

    def _open_tb(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._tb = SummaryWriter(str(self.out / "tb"))

    def _tb_write(self, row: dict) -> None:
        if self._tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "env_steps" and not math.isnan(v):
                self._tb.add_scalar(k, v, row["env_steps"])

    def _close_tb(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _CsvLog:
    def __init__(self, path: Path):
        new = not path.is_file()
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, CSV_FIELDS, extrasaction="ignore")
        if new:
            self.w.writeheader()

    def write(self, row: dict) -> None:
        self.w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _next_multiple(x: int, every: int) -> int:
    return (x // every + 1) * every if every else 1 << 62
