"""Typed training config (dataclasses), presets for the paper's scenarios, JSON round-trip."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal

from lorasa_serve.cli import UsageError

from .envs import EnvConfig

Mode = Literal["ps", "nps", "seps", "mtl", "lorasa", "seps_lorasa"]
Algo = Literal["mappo", "a2po"]


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 64  # width of every hidden layer of the actor (and of its GRU state)
    mlp_depth: int = 3  # Linear -> act -> LayerNorm blocks before the GRU
    recurrent: bool = True  # a GRU after the MLP (False: a feed-forward actor)
    init_log_std: float = -0.7  # Gaussian only: initial state-independent log std (std ~0.5)
    # "PS+ID": append a one-hot of the agent to every observation (the reference does; policy.json then
    # records agent_onehot and the runtime appends it itself, clients send the plain observation)
    agent_onehot: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """Phase 2 (modes lorasa, seps_lorasa). Reference values: ZBN111/ICML2025_LoRASA's scripts."""

    rank: int = 8  # adapter rank r (reference: 8; its ablations 4, 8, 16, full)
    alpha: float = 8.0  # dW = (alpha / r) B A (reference: 8)
    # adapted Linears, e.g. mlp.0,head; None (flag: all): all of them (the reference adapts all 7)
    layers: tuple[str, ...] | None = None
    # adapters' (and log-std offsets') learning rate in phase 2; the reference uses one learning rate
    # for both phases: 3e-4 on MuJoCo, 5e-4 on SMAC (the *_reference presets set it)
    lr: float = 1e-3
    # phase 2 also trains a per-agent log-std offset (zero at the switch, added to the frozen shared
    # log-std), as the reference does (lora_v3/distributions.py); False freezes the log-std entirely
    # (this project's phase 2 before issue 21). Gaussian actions only (ignored for Categorical).
    train_log_std: bool = True
    # how fresh adapters are drawn (dW = 0 either way): "peft" A ~ kaiming-uniform, B = 0 (PEFT's);
    # "reference" A = 0, B ~ kaiming-uniform(a=sqrt(5)) (the reference's lora_v3/linear.py)
    init: Literal["peft", "reference"] = "peft"


@dataclass(frozen=True)
class SepsConfig:
    """Selective parameter sharing: agents clustered into `groups` networks (modes seps, seps_lorasa)."""

    groups: int = 2  # number of agent clusters, each with its own network
    # agent -> group, e.g. 0,1,0; None (flag: all): agents clustered by a probe (training/seps.py)
    assignment: tuple[int, ...] | None = None
    probe_steps: int = 400  # random-action env steps per env for the clustering probe


@dataclass(frozen=True)
class A2POConfig:
    """A2PO (Wang et al., ICLR 2023): agents updated one after another within each PPO update."""

    others_clip: float = 0.1  # clip of the preceding agents' ratio product (the paper's MuJoCo value)
    # agent order per update: semi_greedy (the paper's rule, training/a2po.py), random, fixed (0..N-1)
    order: Literal["semi_greedy", "random", "fixed"] = "semi_greedy"
    adaptive_clip: bool = True  # the agent at position k of N clips at clip * (w k / N + 1 - w)
    clip_weight: float = 0.5  # w above (the reference code's near_linear_clip_param_weight)
    trace: bool = True  # advantage correction: GAE with traces truncated at min(1, preceding ratio)


@dataclass(frozen=True)
class PPOConfig:
    rollout: int = 200  # env steps per env between updates (a multiple of chunk)
    chunk: int = 10  # GRU training sequence length: a rollout is cut into chunks of this many steps
    epochs: int = 5  # passes over each rollout per update
    minibatches: int = 1  # minibatches per epoch
    lr: float = 5e-4  # actor (PS / NPS) learning rate
    critic_lr: float = 5e-4  # critic learning rate
    gamma: float = 0.99  # discount
    gae_lambda: float = 0.95  # GAE lambda
    clip: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # clip of the value change per update
    entropy_coef: float = 0.0  # entropy bonus weight
    value_coef: float = 1.0  # value loss weight
    max_grad_norm: float = 10.0  # gradient norm clip
    critic_hidden: int = 128  # width of the shared MLP critic
    huber_delta: float = 10.0  # Huber loss threshold of the value loss


@dataclass(frozen=True)
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seps: SepsConfig = field(default_factory=SepsConfig)
    a2po: A2POConfig = field(default_factory=A2POConfig)
    algo: Algo = "mappo"  # mappo: all agents updated together; a2po: one after another (--a2po.*)
    # ps: shared actor; nps: one actor per agent; seps: one per agent cluster; mtl: shared trunk with
    # per-agent heads; lorasa: PS, then per-agent LoRA; seps_lorasa: SePS, then per-agent LoRA
    mode: Mode = "lorasa"
    # env steps summed over envs, all phases together (rounded up to a multiple of --env.n-envs x
    # --ppo.rollout, the env steps of one update: summary.json's total_steps_rounded)
    total_steps: int = 900_000
    # lorasa: env step at which the backbone freezes and adapters train (rounded up like
    # --total-steps: summary.json's switch_step_rounded)
    switch_step: int = 600_000
    # lorasa / seps_lorasa: start phase 2 from this phase-1 run / policy directory (skips phase 1);
    # ps: continue the PS run (or snapshot) there: actor, optimisers, critic, value normaliser, RNG
    init_from: str = ""
    # the shared log-std is not trained (with --mode ps --init-from SNAPSHOT: "PS continued with its
    # log-std frozen at the switch", the control arm of reports/grid_logstd.toml)
    freeze_log_std: bool = False
    snapshot_steps: tuple[int, ...] = ()  # also keep the whole run at these env steps: out/snapshots/<n>
    out: str = "runs/halfcheetah_2x3"  # the run directory (policy, checkpoints, metrics)
    seed: int = 1  # seeds the actor, the sampling and the environments
    eval_every: int = 50_000  # env steps between deterministic evaluations (0: only at the end)
    eval_episodes: int = 4  # episodes per evaluation (0: no evaluation)
    final_eval_episodes: int = 16  # episodes of the evaluation at the end (summary.json)
    save_every: int = 100_000  # env steps between checkpoints (policy dir + train_state)
    torch_threads: int = 1  # torch.set_num_threads
    tensorboard: bool = True  # also write TensorBoard event files

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d)


def _build(cls, d: dict):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in hints:
            raise ValueError(f"unknown config key {k!r} for {cls.__name__}")
        sub = _dataclass_type(cls, k)
        if sub is not None:
            v = _build(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def _dataclass_type(cls, name: str):
    import typing
    t = typing.get_type_hints(cls)[name]
    return t if dataclasses.is_dataclass(t) else None


def _mujoco(scenario: str, conf: str, workers: int = 0, **kw) -> TrainConfig:
    """workers: subprocesses pay off for the heavier bodies (Ant, Humanoid: x1.4 on 2 cores, see
    BENCHMARKS.md), not for HalfCheetah / Walker2d, whose steps are cheaper than the pipe round trip."""
    out = f"runs/{scenario.lower()}_{conf.replace('|', '_')}"
    env = EnvConfig("mamujoco", scenario, conf, n_envs=16, workers=workers)
    return TrainConfig(env=env, ppo=PPOConfig(rollout=100), out=out, **kw)


def _smax(map_name: str, **kw) -> TrainConfig:
    return TrainConfig(env=EnvConfig("smax", map_name, episode_limit=0, n_envs=64, workers=0),
                       ppo=PPOConfig(rollout=100, chunk=10, epochs=5, minibatches=2, lr=5e-4,
                                     entropy_coef=0.01),
                       lora=LoraConfig(lr=5e-4), out=f"runs/smax_{map_name}",
                       total_steps=2_000_000, switch_step=1_000_000, eval_every=200_000,
                       eval_episodes=32, save_every=200_000, **kw)


def _reference(base: TrainConfig, n_envs: int, rollout: int, gae_lambda: float, lr: float,
               epochs: int = 5, entropy_coef: float = 0.0, agent_obsk: int | None = None) -> TrainConfig:
    """`base` with the paper's code's settings (ZBN111/ICML2025_LoRASA scripts and YAML): its rollout
    shape (n_envs x rollout = 4,000 env steps per update for MuJoCo), GAE lambda, epochs, one learning
    rate for actor, critic and adapters (fresh Adam at the switch, as ours), Adam eps 1e-5 (ours
    always), LoRA init A = 0 / B = kaiming, the agent one-hot ("PS+ID") and the per-agent log-std offset
    (our default already). Not reproduced: its tanh-squashed Gaussian with std = 0.5 sigmoid(log_std)
    (ours: exp(log_std), actions clipped to the box by the env wrapper), its per-vector observation
    standardisation before the input LayerNorm (ours: the input LayerNorm alone), a fresh value
    normaliser at the switch (ours carries the PS run's)."""
    env = replace(base.env, n_envs=n_envs, **({} if agent_obsk is None else {"agent_obsk": agent_obsk}))
    ppo = replace(base.ppo, rollout=rollout, gae_lambda=gae_lambda, lr=lr, critic_lr=lr, epochs=epochs,
                  minibatches=1, chunk=10, entropy_coef=entropy_coef)
    return replace(base, env=env, ppo=ppo, model=replace(base.model, agent_onehot=True),
                   lora=replace(base.lora, lr=lr, init="reference", train_log_std=True),
                   out=base.out + "_reference")


PRESETS: dict[str, TrainConfig] = {
    "halfcheetah_2x3": _mujoco("HalfCheetah", "2x3"),
    "walker2d_2x3": _mujoco("Walker2d", "2x3"),
    "ant_4x2": _mujoco("Ant", "4x2", workers=2),
    "humanoid_9_8": _mujoco("Humanoid", "9|8", workers=2),
    "smax_3s5z": _smax("3s5z"),
    "smax_3s5z_vs_3s6z": _smax("3s5z_vs_3s6z"),
}
# the paper's code's settings (see _reference): HalfCheetah 16 envs x 250 steps, lambda 0.93, lr 3e-4;
# Humanoid 25 x 160, lambda 0.9, 3 epochs, lr 3e-4, full observability (the reference's agent_obsk -1;
# mamujoco_v1 has no -1: k = 3 is where its Humanoid 9|8 observations stop growing, 244 / 176);
# SMAC 10 x 320, lambda 0.95, lr 5e-4, entropy 0.01 (here on SMAX)
PRESETS.update({
    "halfcheetah_2x3_reference": _reference(PRESETS["halfcheetah_2x3"], 16, 250, 0.93, 3e-4),
    "humanoid_9_8_reference": _reference(PRESETS["humanoid_9_8"], 25, 160, 0.9, 3e-4, epochs=3, agent_obsk=3),
    "smax_3s5z_reference": _reference(PRESETS["smax_3s5z"], 10, 320, 0.95, 5e-4, entropy_coef=0.01),
})


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}: pass --preset one of {', '.join(sorted(PRESETS))}") from None


def with_overrides(cfg, overrides: dict):
    """Apply dotted overrides {'ppo.lr': 1e-3, 'env.n_envs': 4} to a (nested) frozen dataclass."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, v in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            flat[key] = v
    for head, sub in nested.items():
        flat[head] = with_overrides(getattr(cfg, head), sub)
    return replace(cfg, **flat)


def check_config(cfg: TrainConfig) -> None:
    """UsageError (one line naming the flag to fix) for values training cannot run with; called before
    anything is written."""
    p, e = cfg.ppo, cfg.env
    positive = {"--total-steps": cfg.total_steps, "--ppo.rollout": p.rollout, "--ppo.chunk": p.chunk,
                "--ppo.epochs": p.epochs, "--ppo.minibatches": p.minibatches, "--env.n-envs": e.n_envs,
                "--model.hidden": cfg.model.hidden, "--lora.rank": cfg.lora.rank,
                "--torch-threads": cfg.torch_threads}
    for flag, v in positive.items():
        if v < 1:
            raise UsageError(f"{flag} {v} must be >= 1")
    non_negative = {"--eval-every": cfg.eval_every, "--eval-episodes": cfg.eval_episodes,
                    "--final-eval-episodes": cfg.final_eval_episodes, "--save-every": cfg.save_every,
                    "--switch-step": cfg.switch_step, "--env.workers": e.workers}
    for flag, v in non_negative.items():
        if v < 0:
            raise UsageError(f"{flag} {v} must be >= 0")
    if p.rollout % p.chunk:
        raise UsageError(f"--ppo.rollout {p.rollout} must be a multiple of --ppo.chunk {p.chunk}: "
                         f"change one of them (e.g. --ppo.rollout {max(p.chunk, p.rollout // p.chunk * p.chunk)})")
    if not 0.0 <= cfg.a2po.clip_weight <= 1.0:
        raise UsageError(f"--a2po.clip-weight {cfg.a2po.clip_weight} must be in [0, 1] (0: the same clip "
                         "for every position)")
    if cfg.lora.init not in ("peft", "reference"):
        raise UsageError(f"--lora.init {cfg.lora.init} must be peft or reference")
    if e.backend == "ray" and (e.kind == "smax" or e.workers < 1):
        raise UsageError(f"--env.backend ray steps MaMuJoCo / SMAC envs in --env.workers Ray actors: pass "
                         f"--env.workers >= 1 (got {e.workers})" if e.kind != "smax" else
                         "--env.backend ray is for MaMuJoCo / SMAC (SMAX steps its envs with JAX vmap in one "
                         "process): drop it")
    if not cfg.out:
        raise UsageError("--out is empty: pass the run directory to write")
    check_init_mode(cfg.init_from, cfg.mode)


def check_init_mode(init_from: str, mode: str) -> None:
    if init_from and mode not in ("lorasa", "seps_lorasa", "ps"):
        raise UsageError(f"--init-from starts LoRA phase 2 (--mode lorasa or seps_lorasa) or continues a PS "
                         f"run (--mode ps), not --mode {mode}: change --mode or drop --init-from")
