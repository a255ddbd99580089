"""The training loop: phases (PS -> LoRA), periodic evaluation, metrics, checkpoints, the policy dir.

Output directory (`cfg.out`):
    policy.json, backbone.safetensors, adapters/   the servable policy (PS or PS+LoRA; Engine.from_dir)
    env.json                                       which task it was trained on (read by lorasa-eval)
    phase1/                                        lorasa runs: the PS (SePS) run at the switch step
    snapshots/<env_steps>/                         the run at each of `snapshot_steps` (phase-2 starts)
    train_state/                                   critic, optimisers, counters (resume / phase 2)
    metrics.csv, tb/, learning_curve.png, summary.json (final evaluation, parameters, speed)
SePS, MTL, NPS and SePS+LoRA actors have no single shared backbone: their runs hold train_state only
(`lorasa-eval` acts with the training actor).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lorasa_serve import LoraSpec, PolicySpec, env_file, load_policy, save_policy
from lorasa_serve.artifacts import atomic_write
from lorasa_serve.cli import UsageError

from . import checkpoint, rundir
from .actor import Actor
from .config import TrainConfig, check_config
from .envs import EnvConfig, EnvInfo, make_vec_env
from .episodes import EpisodeStats, run_episodes
from .a2po import a2po_update
from .mappo import Critic, Cursor, Policy, ValueNorm, env_actions, grouped, ppo_update
from .rollouts import make_rollouts

SUMMARY_FILE = "summary.json"
LORA_MODES = ("lorasa", "seps_lorasa")
CSV_FIELDS = ["env_steps", "phase", "updates", "wall_s", "sps", "rollout_s", "update_s",
              "train_return", "train_win", "eval_return", "eval_std", "eval_win", "policy_loss",
              "value_loss", "entropy", "approx_kl", "clip_frac"]


def build_spec(info: EnvInfo, cfg: TrainConfig) -> PolicySpec:
    m, lo = cfg.model, cfg.lora
    return PolicySpec(agents=info.agent_specs(), hidden=m.hidden, mlp_depth=m.mlp_depth,
                      recurrent=m.recurrent, action=info.action,
                      agent_onehot=info.n_agents if m.agent_onehot else 0,
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
    env_file.write_env_file(directory, cfg.env.env_block(), trained_by="lorasa-train", actor=kind,
                            mode=cfg.mode, env_steps=counters.env_steps, seed=cfg.seed)


def read_env_json(directory: Path) -> EnvConfig:
    """The task of a policy dir, from its env.json (lorasa_serve.env_file); UsageError without one."""
    try:
        return EnvConfig(**env_file.read_env_block(directory))
    except env_file.EnvFileMissingError as e:
        raise UsageError(f"{e.path} is missing: pass the task it was trained on with --env.kind, "
                         "--env.scenario, --env.agent-conf (policies written by lorasa-train have it)") from None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, env_factory=None):
        """`env_factory`: an `EnvFactory` replacing the config's envs for rollouts (benchmarks, tests)."""
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.cfg, self.out, self.resumed = cfg, Path(cfg.out), resume
        if not resume:
            rundir.check_fresh_out(self.out)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.rollouts = make_rollouts(cfg.env, env_factory)
        self.venv = getattr(self.rollouts, "venv", None)  # the local backend's vector env
        self.info = self.rollouts.info
        self._eval_env = None
        self._tb = None
        try:
            self._build(resume)
        except BaseException:  # e.g. --init-from a run of other agents: no worker processes left behind
            self.rollouts.close()
            raise
        self.out.mkdir(parents=True, exist_ok=True)  # only once everything above checked out

    def _build(self, resume: bool) -> None:
        cfg = self.cfg
        self.critic = Critic(self.info.state_dim, cfg.ppo.critic_hidden)
        self.vnorm = ValueNorm()
        self.counters = checkpoint.Counters()
        self.actor = self._resume() if resume else self._fresh_actor()
        self.actor_opt = self._actor_opt()
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.ppo.critic_lr, eps=1e-5)
        if resume:
            checkpoint.load_optimizers(self.out, self.actor_opt, self.critic_opt, self.g)
        elif self._continues():
            checkpoint.load_optimizers(Path(cfg.init_from), self.actor_opt, self.critic_opt, self.g)
        if cfg.freeze_log_std and "log_std" in self.actor.trainable:
            self.actor.freeze("log_std")
        self.policy = Policy.build(self.actor, self.info)

    def _continues(self) -> bool:
        """--mode ps --init-from: this run continues another PS run from its checkpoint."""
        return self.cfg.mode == "ps" and bool(self.cfg.init_from)

    # --- set-up -------------------------------------------------------------------------------
    def _fresh_actor(self) -> Actor:
        cfg = self.cfg
        spec = build_spec(self.info, cfg)
        if cfg.mode in LORA_MODES and cfg.init_from:
            return self._phase2_from(Path(cfg.init_from))
        if self._continues():
            return self._continue_from(Path(cfg.init_from))
        if cfg.mode == "nps":
            return Actor.new_nps(spec, self.g, cfg.model.init_log_std)
        if cfg.mode == "mtl":
            return Actor.new_mtl(spec, self.g, cfg.model.init_log_std)
        if cfg.mode in ("seps", "seps_lorasa"):
            return Actor.new_seps(spec, self.g, cfg.model.init_log_std, self._seps_groups())
        return Actor.new_ps(spec, self.g, cfg.model.init_log_std)

    def _seps_groups(self) -> tuple[int, ...]:
        sc, n = self.cfg.seps, self.info.n_agents
        if sc.assignment is not None:
            if len(sc.assignment) != n:
                raise UsageError(f"--seps.assignment {','.join(map(str, sc.assignment))} must give a group for "
                                 f"each of the {n} agents of {self.info.name} (or drop it to cluster them)")
            from .seps import renumber
            return tuple(int(v) for v in renumber(sc.assignment))
        from .seps import cluster_agents
        probe = make_vec_env(self.cfg.env, workers=0)
        try:
            return cluster_agents(probe, min(sc.groups, n), sc.probe_steps, self.cfg.seed)
        finally:
            probe.close()

    def _phase2_from(self, src: Path) -> Actor:
        """Phase 2 from a phase-1 run (PS or SePS: its train_state, critic included) or a PS policy dir:
        frozen base, fresh adapters."""
        rundir.check_init_source(src)
        if (src / checkpoint.STATE_DIR / "state.json").is_file():
            meta = checkpoint.load_meta(src)
            base = actor_from_state(src, meta)
            checkpoint.load_critic(src, self.critic)
            self.vnorm.load(meta["value_norm"])
            self.counters.env_steps = int(meta["counters"]["env_steps"])
        else:
            spec0, backbone, adapters = load_policy(src)
            if adapters:
                raise UsageError(f"--init-from {src} already has adapters: pass its phase-1 (PS) policy "
                                 "directory (a lorasa run keeps it in phase1/)")
            base = Actor(spec0, "ps", backbone, groups=(0,) * len(spec0.agents))
        if base.kind not in ("ps", "seps"):
            raise UsageError(f"--init-from {src} holds a {base.kind} actor: pass a PS or SePS run "
                             "(lorasa-train --mode ps / seps) or its snapshots/<step>")
        if tuple(base.spec.agents) != self.info.agent_specs():
            fix = ("drop the --env.* overrides (the env then comes from the source's env.json)"
                   if rundir.source_env(src) else "pass the task it was trained on with --env.* flags")
            raise UsageError(f"--init-from {src} was trained for agents {_agents(base.spec.agents)}, but "
                             f"env {self.info.name} has {_agents(self.info.agent_specs())}: {fix}, or init "
                             f"from a run of {self.info.name}")
        self.counters.phase_switch_step = self.counters.env_steps
        return Actor.lora_from_base(base, self.g, self._lora_spec(base.spec), self.cfg.lora.init)

    def _lora_spec(self, base: PolicySpec) -> PolicySpec:
        """The phase-2 spec: `base` with the configured LoRA (rank, alpha, layers, log-std offsets)."""
        lo = self.cfg.lora
        return replace(base, lora=LoraSpec(lo.rank, lo.alpha, None if lo.layers is None else tuple(lo.layers),
                                           log_std_offset=lo.train_log_std and base.action == "gaussian"))

    def _continue_from(self, src: Path) -> Actor:
        """--mode ps --init-from: the PS run checkpointed in `src` (actor, critic, value normaliser,
        counters; optimisers and RNG are loaded in _build), continued here from its env step."""
        rundir.check_init_source(src)
        if not rundir.has_checkpoint(src):
            raise UsageError(f"--mode ps --init-from {src} continues a run and needs its "
                             f"{checkpoint.STATE_DIR}/: pass a PS run directory or its snapshots/<step>")
        meta = checkpoint.load_meta(src)
        actor = actor_from_state(src, meta)
        if actor.kind != "ps" or tuple(actor.spec.agents) != self.info.agent_specs():
            raise UsageError(f"--mode ps --init-from {src} holds a {actor.kind} actor for agents "
                             f"{_agents(actor.spec.agents)}: pass a PS run of {self.info.name}")
        checkpoint.load_critic(src, self.critic)
        self.vnorm.load(meta["value_norm"])
        c = meta["counters"]
        self.counters = checkpoint.Counters(env_steps=int(c["env_steps"]), updates=int(c["updates"]),
                                            phase_switch_step=int(c["env_steps"]))
        return actor

    def _resume(self) -> Actor:
        meta = rundir.check_resume(self.out)
        self.counters = checkpoint.Counters(**meta["counters"])
        self.vnorm.load(meta["value_norm"])
        checkpoint.load_critic(self.out, self.critic)
        return actor_from_state(self.out, meta)

    def _actor_opt(self) -> torch.optim.Optimizer:
        lr = self.cfg.lora.lr if self.actor.kind == "lora" else self.cfg.ppo.lr
        return torch.optim.Adam(list(self.actor.trainable.values()), lr=lr, eps=1e-5)

    def _switch_to_lora(self) -> None:
        """Phase 1 -> 2: save the PS (SePS) run to phase1/, freeze it, train fresh per-agent adapters."""
        self.save_policy(self.out / "phase1")
        self.actor = Actor.lora_from_base(self.actor, self.g, self._lora_spec(self.actor.spec), self.cfg.lora.init)
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
                "actor_kind": self.actor.kind, "groups": list(self.actor.groups),
                "spec": self.actor.spec.to_dict(),
                "value_norm": self.vnorm.to_dict()}
        checkpoint.save(directory, meta, self.actor, self.critic, self.actor_opt, self.critic_opt, self.g)

    def evaluate(self, episodes: int | None = None) -> EpisodeStats:
        cfg = self.cfg
        n = episodes or cfg.eval_episodes
        if self._eval_env is None or self._eval_env.n_envs != n:
            if self._eval_env is not None:
                self._eval_env.close()
            self._eval_env = make_vec_env(cfg.env, n_envs=n, workers=0)
        return run_episodes(self._eval_env, torch_act_fn(self.policy), seed=cfg.seed + 10_000)

    # --- the loop -----------------------------------------------------------------------------
    def train(self, progress: bool = True) -> dict:
        cfg, c = self.cfg, self.counters
        check_config(cfg)
        if self.resumed:  # a killed run logged past its checkpoint: those steps are trained again
            rundir.truncate_metrics(self.out / "metrics.csv", c.env_steps)
        writer = _CsvLog(self.out / "metrics.csv")
        self._open_tb()
        cur, recent, last = self._start_cursor(), [], None
        next_eval = _next_multiple(c.env_steps, cfg.eval_every)
        next_save = _next_multiple(c.env_steps, cfg.save_every)
        per, total, switch = self._rounded_steps()
        notes = [f"--total-steps {cfg.total_steps:,} -> {total:,}"] if total != cfg.total_steps else []
        if switch is not None and switch != cfg.switch_step:
            notes.append(f"--switch-step {cfg.switch_step:,} -> {switch:,}")
        if notes and progress:
            tqdm.write(f"note: {', '.join(notes)} (rounded up to multiples of {per:,} env steps per update: "
                       f"--env.n-envs x --ppo.rollout)")
        bar = tqdm(total=total, initial=c.env_steps, unit="step", disable=not progress,
                   desc=f"{cfg.mode} {self.info.name}", dynamic_ncols=True)
        t_start, prev_steps = time.perf_counter() - c.wall_s, c.env_steps  # wall_s continues on resume
        while c.env_steps < cfg.total_steps:
            if cfg.mode in LORA_MODES and self.actor.kind != "lora" and c.env_steps >= cfg.switch_step:
                self._switch_to_lora()
            row, cur, recent = self._iteration(cur, recent)
            c.wall_s = time.perf_counter() - t_start
            row["wall_s"] = round(c.wall_s, 2)
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
            for s in (s for s in cfg.snapshot_steps if prev_steps < s <= c.env_steps):
                self._snapshot(s)
            prev_steps = c.env_steps
            bar.update(cfg.ppo.rollout * self.rollouts.n_envs)
            bar.set_postfix(ret=f"{row['train_return']:.1f}", sps=f"{row['sps']:.0f}", phase=self.actor.kind)
        bar.close()
        writer.close()
        final = self.evaluate(cfg.final_eval_episodes) if cfg.final_eval_episodes > 0 else last
        summary = {"env": self.info.name, "algo": cfg.algo, "mode": cfg.mode, "seed": cfg.seed,
                   "env_steps": c.env_steps, "phase_switch_step": c.phase_switch_step,
                   "init_from": cfg.init_from, "groups": list(self.actor.groups),
                   "final_eval": None if final is None else final.to_dict(),
                   "trainable_params": self.actor.n_trainable(), "actor_params": self.actor.n_total(),
                   "train_wall_s": round(time.perf_counter() - t_start, 2)}
        # what the run really did, rounded up to whole updates (the note above; --help says so too)
        summary.update(steps_per_update=per, total_steps_rounded=total, switch_step_rounded=switch)
        if getattr(self.rollouts, "traffic", None):  # the Ray backend: bytes over the network per actor kind
            summary["ray_traffic_bytes"] = self.rollouts.traffic
        atomic_write(self.out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        self._finish()
        return summary

    def _rounded_steps(self) -> tuple[int, int, int | None]:
        """(env steps per update, --total-steps and --switch-step rounded up to whole updates: where
        the run really ends and switches; switch None when this run has no switch)."""
        cfg = self.cfg
        per = cfg.ppo.rollout * self.rollouts.n_envs  # env steps per update: the run moves in these
        up = lambda n: -(-n // per) * per  # noqa: E731
        switch = up(cfg.switch_step) if cfg.mode in LORA_MODES and not cfg.init_from else None
        return per, up(cfg.total_steps), switch

    def _snapshot(self, step: int) -> None:
        """The run as it is now (policy / train_state / metrics) in out/snapshots/<step>/: a phase-2 start."""
        d = self.out / "snapshots" / str(step)
        self.save_policy(d)
        shutil.copyfile(self.out / "metrics.csv", d / "metrics.csv")

    def _start_cursor(self) -> Cursor:
        """Fresh episodes in every env (a resumed run restarts its episodes), zero GRU states."""
        E, spec = self.rollouts.n_envs, self.actor.spec
        h0 = torch.zeros(self.info.n_agents, E, spec.hidden) if spec.recurrent else None
        return self.rollouts.start(self.cfg.seed + self.counters.updates * 7919, h0)

    def _iteration(self, cur: Cursor, recent: list) -> tuple[dict, Cursor, list]:
        """One rollout + one PPO update -> (metrics row, new cursor, the last 20 finished episodes)."""
        cfg, c = self.cfg, self.counters
        T, E = cfg.ppo.rollout, self.rollouts.n_envs
        t0 = time.perf_counter()
        ro, cur, eps = self.rollouts.collect(self.policy, self.critic, self.vnorm, cur, T, cfg.ppo.gamma, self.g)
        t1 = time.perf_counter()
        if cfg.algo == "a2po":
            stats = a2po_update(self.policy, self.critic, self.vnorm, ro, cfg.ppo, cfg.a2po, self.actor_opt,
                                self.critic_opt, self.g)
        else:
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
        from .plots import save_learning_curve
        self.save_policy(self.out)
        self._close_tb()
        save_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png", self.cfg.mode,
                            title=f"{self.info.name}: {self.cfg.mode}")
        self.close()

    def close(self) -> None:
        self.rollouts.close()
        if self._eval_env is not None:
            self._eval_env.close()

    def _open_tb(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        # resumed: TensorBoard drops the events a killed run wrote after the checkpoint's step
        purge = self.counters.env_steps + 1 if self.resumed else None
        self._tb = SummaryWriter(str(self.out / "tb"), purge_step=purge)

    def _tb_write(self, row: dict) -> None:
        if self._tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "env_steps" and not math.isnan(v):
                self._tb.add_scalar(k, v, row["env_steps"])

    def _close_tb(self) -> None:
        if self._tb is not None:
            self._tb.close()


def actor_from_state(directory: Path, meta: dict) -> Actor:
    """The actor saved in `directory`/train_state (any kind)."""
    trainable, frozen = checkpoint.load_actor_tensors(directory)
    spec = PolicySpec.from_dict(meta["spec"])
    groups = meta.get("groups")
    return Actor(spec, meta["actor_kind"], trainable, frozen, None if groups is None else tuple(groups))


def load_run_policy(directory: Path) -> tuple[Policy, EnvConfig]:
    """A finished (or snapshotted) run's training actor, ready to act: (Policy, its env config)."""
    directory = Path(directory)
    env_cfg = read_env_json(directory)
    actor = actor_from_state(directory, checkpoint.load_meta(directory))
    probe = make_vec_env(replace(env_cfg, n_envs=1), workers=0)
    info = probe.info
    probe.close()
    return Policy.build(actor, info), env_cfg


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


def _agents(agents) -> str:
    return "(" + ", ".join(f"{a.agent_id} obs {a.obs_dim} act {a.act_dim}" for a in agents) + ")"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _next_multiple(x: int, every: int) -> int:
    return (x // every + 1) * every if every else 1 << 62
