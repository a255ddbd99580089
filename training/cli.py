"""`lorasa-train`: typed config from CLI flags via a small generic dataclass -> argparse helper.

    lorasa-train --preset halfcheetah_2x3 --mode lorasa --total-steps 400000 --switch-step 200000
    lorasa-train --preset humanoid_9_8 --mode lorasa --init-from runs/ps --out runs/lora
    lorasa-train --resume runs/halfcheetah_2x3 [--total-steps 600000]
    lorasa-train --preset smax_3s5z --ppo.lr 3e-4 --env.n-envs 32 --lora.layers mlp.0,head

Every field of `TrainConfig` is a flag (nested ones dotted: --ppo.lr, --env.scenario); only flags you
give override the preset (or the defaults). A flag's help is its field's comment in the config classes
(training/config.py, training/envs/base.py); the defaults shown are those without --preset. A run moves
in whole updates of --env.n-envs x --ppo.rollout env steps: --total-steps and --switch-step are rounded
up to multiples of it (a note says so at the start; summary.json records steps_per_update,
total_steps_rounded and switch_step_rounded).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import typing
from dataclasses import replace
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, UsageError, print_error, run_cli

from . import rundir
from .config import PRESETS, TrainConfig, check_config, check_init_mode, preset, with_overrides
from .errors import WorkerLostError


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per (nested) field, its help the field's comment and its default the class's; defaults
    are SUPPRESSed so only given flags appear in the namespace."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        t, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(t):
            add_dataclass_args(parser, t, name + ".")
            continue
        flag = "--" + name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {_shown(f.default)})".replace("%", "%%")
        kw: dict = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        origin, args = typing.get_origin(t), typing.get_args(t)
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw.update(choices=list(args), type=type(args[0]))
        elif t in (int, float, str):
            kw["type"] = t
        elif _tuple_item(t) is not None:
            kw.update(type=_tuple_parser(_tuple_item(t)), metavar="A,B,...|all")
        else:
            raise TypeError(f"no CLI parser for field {name}: {t}")
        parser.add_argument(flag, **kw)


def field_help(cls) -> dict[str, str]:
    """Field name -> the comment that documents it in the class's source: the `# ...` lines right above
    the field and the `# ...` after it, joined ("" for an undocumented field)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, ln = [], node.lineno - 1
        while ln >= 1 and lines[ln - 1].lstrip().startswith("#"):
            above.insert(0, comments[ln])
            ln -= 1
        own = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        out[node.target.id] = " ".join(above + own)
    return out


def _shown(value) -> str:
    """A field default as the flag would be written."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if value is None:  # only `tuple[...] | None` fields default to None: all layers / clustered
        return "all"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != "" else '""'


def _tuple_item(t):
    """The item type of `tuple[X, ...]` or `tuple[X, ...] | None`, else None."""
    for a in (t, *typing.get_args(t)):
        if typing.get_origin(a) is tuple:
            return typing.get_args(a)[0]
    return None


def _tuple_parser(item):
    def parse(s: str):
        if s in ("all", ""):
            return None
        return tuple(item(x.strip()) for x in s.split(",") if x.strip())
    return parse


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Flags -> (config, resume?). UsageError / a one-line parse error for anything that cannot run;
    nothing is written here."""
    ns = vars(parser().parse_args(argv))
    base_name, resume, show = ns.pop("preset"), ns.pop("resume"), ns.pop("print_config")
    if resume:
        if "out" in ns and Path(ns["out"]).resolve() != Path(resume).resolve():
            raise UsageError(f"--resume continues in {resume} itself: drop --out {ns['out']}")
        base = TrainConfig.from_dict(rundir.check_resume(Path(resume))["config"])
        ns["out"] = resume
    else:
        base = preset(base_name) if base_name else TrainConfig()
        init_from = ns.get("init_from", base.init_from)
        check_init_mode(init_from, ns.get("mode", base.mode))
        base = _env_from_init_source(base, init_from, base_name, ns)
    cfg = with_overrides(base, ns)
    check_config(cfg)
    if show:
        print(json.dumps(cfg.to_dict(), indent=2))
        sys.exit(0)
    rundir.check_out_writable(Path(cfg.out))
    if not resume:
        rundir.check_fresh_out(Path(cfg.out))
    return cfg, bool(resume)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="lorasa-train", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a scenario preset")
    p.add_argument("--resume", metavar="OUT", help="continue the run saved in OUT (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_dataclass_args(p, TrainConfig)
    return p


def resolve_flags(argv: list[str]) -> TrainConfig:
    """The config fresh-run flags `argv` ask for (preset + flags; no --resume), without reading --init-from
    or checking anything: what training/grid.py records in run.json and compares between sessions.
    UsageError for flags lorasa-train would reject (its message for a grid file: no "see --help")."""
    p = parser()
    try:
        ns = vars(p.parse_args(argv))
    except UsageError as e:
        raise UsageError(str(e).removesuffix(f"; see {p.prog} --help")) from None
    base_name = ns.pop("preset")
    ns.pop("resume"), ns.pop("print_config")
    return with_overrides(preset(base_name) if base_name else TrainConfig(), ns)


def _env_from_init_source(base: TrainConfig, init_from: str, preset_name: str | None,
                          flags: dict) -> TrainConfig:
    """Phase 2 runs on the task its phase-1 source was trained on. Without --preset the source's task is
    filled in (explicit --env.* flags still win; the trainer then checks that the agents match); an
    explicit --preset (with its --env.* flags) must name the source's task."""
    if not init_from:
        return base
    rundir.check_init_source(Path(init_from))
    task = rundir.source_env(Path(init_from))
    if task is None:
        return base
    if preset_name is None:
        return replace(base, env=replace(base.env, **task))
    own = with_overrides(base, flags).env
    if any(getattr(own, k) != task[k] for k in rundir.TASK_IDENTITY if k in task):
        src = replace(own, **task)
        a, b = (e.name + (f" agent_obsk {e.agent_obsk}" if own.agent_obsk != src.agent_obsk else "")
                for e in (own, src))
        raise UsageError(f"--preset {preset_name} trains {a} but --init-from {init_from} was trained on {b}; "
                         f"drop --preset (phase 2 then runs on the source's task) or pass a phase-1 run of "
                         f"{preset_name}")
    return base


def run(argv: list[str] | None) -> int:
    cfg, resume = parse_config(argv)
    from .trainer import Trainer
    trainer = Trainer(cfg, resume=resume)
    try:
        summary = trainer.train()
    except WorkerLostError as e:  # a Ray rollout worker's node died: one line, the checkpoint is whole
        print_error("lorasa-train", e)
        return 1
    print(json.dumps({"out": cfg.out, **summary}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("lorasa-train", run, argv)


if __name__ == "__main__":
    sys.exit(main())
