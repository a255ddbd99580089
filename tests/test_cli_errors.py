"""Every user error of lorasa-train / lorasa-eval / lorasa-report: exit status 2, ONE line on stderr that
names the fix, nothing written. Each CLI's `main([...])` runs in-process; one subprocess checks the real
console script's exit status and stderr."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_policy

from training.cli import main as train_main
from training.cli import parse_config
from training.evaluate import main as eval_main
from training.report import main as report_main

TINY = ["--env.episode-limit", "30", "--env.n-envs", "2", "--env.workers", "0", "--model.hidden", "16",
        "--ppo.rollout", "20", "--ppo.chunk", "10", "--ppo.epochs", "1", "--ppo.critic-hidden", "32",
        "--lora.rank", "2", "--lora.alpha", "4", "--total-steps", "40", "--eval-every", "0",
        "--eval-episodes", "0", "--final-eval-episodes", "0", "--save-every", "40", "--no-tensorboard"]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root -> (size, mtime_ns): equal before and after = nothing written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def usage_error(capsys, root: Path, main, argv: list[str], *needles: str) -> str:
    """Run main(argv): exit 2, one stderr line holding every needle, `root` unchanged -> the line."""
    before = tree(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("lorasa-train", "lorasa-eval", "lorasa-report")) and ": error: " in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert tree(root) == before
    return lines[0]


@pytest.fixture(scope="module")
def ps_run(tmp_path_factory) -> Path:
    """A finished tiny PS run of HalfCheetah 2x3 (a phase-1 source; has env.json and train_state)."""
    out = tmp_path_factory.mktemp("ps") / "run"
    assert train_main(["--mode", "ps", "--out", str(out), *TINY]) == 0
    return out


# --- lorasa-train -----------------------------------------------------------------------------------

def test_train_resume_missing_dir(tmp_path, capsys):
    usage_error(capsys, tmp_path, train_main, ["--resume", str(tmp_path / "nope")],
                "no such directory", "start a new run with --out")
    assert not (tmp_path / "nope").exists()


def test_train_resume_dir_that_is_no_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    usage_error(capsys, tmp_path, train_main, ["--resume", str(tmp_path)],
                "train_state/state.json is missing", "start a new run with --out")


def test_train_resume_with_another_out(tmp_path, ps_run, capsys):
    usage_error(capsys, tmp_path, train_main, ["--resume", str(ps_run), "--out", str(tmp_path / "o")],
                "drop --out")


def test_train_init_from_missing_dir(tmp_path, capsys):
    out = tmp_path / "out"
    usage_error(capsys, tmp_path, train_main, ["--init-from", str(tmp_path / "nope"), "--out", str(out), *TINY],
                "no such directory", "lorasa-train --mode ps")
    assert not out.exists()


def test_train_init_from_dir_without_train_state(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    usage_error(capsys, tmp_path, train_main,
                ["--init-from", str(tmp_path / "src"), "--out", str(tmp_path / "out"), *TINY],
                "train_state/state.json missing", "pass the --out directory of a lorasa-train --mode ps")


def test_train_init_from_other_envs_agents(tmp_path, ps_run, capsys):
    """The env was overridden explicitly (6x1: six one-joint agents): fails before creating --out."""
    out = tmp_path / "out"
    line = usage_error(capsys, tmp_path, train_main,
                       ["--init-from", str(ps_run), "--env.agent-conf", "6x1", "--out", str(out), *TINY],
                       "was trained for agents (agent_0 obs 12 act 3, agent_1 obs 12 act 3)",
                       "drop the --env.* overrides")
    assert "HalfCheetah 6x1" in line and not out.exists()


def test_train_init_from_takes_env_from_source(tmp_path, ps_run):
    """Without --preset and --env.* task flags the task is the source's; with --env.* flags the flags
    win; an explicit --preset of the source's task keeps the preset's settings."""
    cfg, resume = parse_config(["--init-from", str(ps_run), "--out", str(tmp_path / "o")])
    assert not resume
    assert (cfg.env.kind, cfg.env.scenario, cfg.env.agent_conf, cfg.env.episode_limit) == \
        ("mamujoco", "HalfCheetah", "2x3", 30)
    assert cfg.env.n_envs == 8  # parallelism stays the defaults' (the source ran 2)
    cfg, _ = parse_config(["--init-from", str(ps_run), "--env.agent-conf", "6x1", "--out", str(tmp_path / "o")])
    assert (cfg.env.scenario, cfg.env.agent_conf) == ("HalfCheetah", "6x1")
    cfg, _ = parse_config(["--preset", "halfcheetah_2x3", "--init-from", str(ps_run), "--out", str(tmp_path / "o")])
    assert (cfg.env.scenario, cfg.env.agent_conf, cfg.env.episode_limit, cfg.env.n_envs) == \
        ("HalfCheetah", "2x3", 1000, 16)


@pytest.mark.parametrize("flags,needles", [
    (["--preset", "humanoid_9_8"], ["--preset humanoid_9_8 trains Humanoid 9|8 but --init-from",
                                    "was trained on HalfCheetah 2x3", "drop --preset",
                                    "phase-1 run of humanoid_9_8"]),
    (["--preset", "halfcheetah_2x3", "--env.agent-obsk", "2"],
     ["trains HalfCheetah 2x3 agent_obsk 2 but", "was trained on HalfCheetah 2x3 agent_obsk 1"]),
])
def test_train_init_from_with_a_preset_of_another_task(tmp_path, ps_run, capsys, flags, needles):
    """An explicit --preset (with its --env.* flags) never silently trains the source's other task."""
    out = tmp_path / "lora"
    usage_error(capsys, tmp_path, train_main, [*flags, "--mode", "lorasa", "--init-from", str(ps_run),
                                               "--out", str(out)], *needles)
    assert not out.exists()


def test_train_init_from_runs_phase2_on_the_source_task(tmp_path, ps_run):
    """`--init-from <HalfCheetah run>` without --preset trains on HalfCheetah with the source's limit."""
    out = tmp_path / "lora"
    flags = [f for f in TINY if f not in ("--env.episode-limit", "30")]  # the source's limit is used
    assert train_main(["--init-from", str(ps_run), "--out", str(out), *flags, "--total-steps", "80"]) == 0
    env = json.loads((out / "env.json").read_text())["env"]
    assert (env["scenario"], env["agent_conf"], env["episode_limit"]) == ("HalfCheetah", "2x3", 30)
    assert json.loads((out / "summary.json").read_text())["phase_switch_step"] == 40


def test_train_out_that_cannot_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    usage_error(capsys, tmp_path, train_main, [*TINY, "--out", str(tmp_path / "file")],
                f"--out {tmp_path / 'file'} is a file, not a directory", "pass a directory")
    usage_error(capsys, tmp_path, train_main, [*TINY, "--out", str(tmp_path / "file" / "a" / "run")],
                f"{tmp_path / 'file'} is a file, so the run directory cannot be created", "another --out")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: a chmod 500 one, or for root (who may write anywhere) a
    read-only mount such as a container's /proc/sys."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
            yield Path("/proc/sys")
            return
        pytest.skip("running as root without a read-only directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    yield ro
    ro.chmod(0o700)


def test_train_out_in_a_read_only_directory(tmp_path, read_only_dir, capsys):
    usage_error(capsys, tmp_path, train_main, [*TINY, "--out", str(read_only_dir / "new" / "run")],
                f"{read_only_dir} is not writable", "pass a directory you can write to")


@pytest.mark.parametrize("argv,needles", [
    (["--ppo.lr", "abc"], ["argument --ppo.lr: invalid float value: 'abc'", "see lorasa-train --help"]),
    (["--preset", "halfcheeta"], ["invalid choice: 'halfcheeta'", "choose from", "'halfcheetah_2x3'"]),
    (["--ppo.lrr", "1e-3"], ["unrecognized arguments", "did you mean --ppo.lr?"]),
    (["--mode", "lora"], ["invalid choice: 'lora'", "'lorasa'"]),
    (["--ppo.rollout", "25"], ["--ppo.rollout 25 must be a multiple of --ppo.chunk 10", "--ppo.rollout 20"]),
    (["--total-steps", "0"], ["--total-steps 0 must be >= 1"]),
    (["--env.n-envs", "0"], ["--env.n-envs 0 must be >= 1"]),
    (["--mode", "nps", "--init-from", "x"], ["--init-from starts LoRA phase 2", "continues a PS run", "change --mode"]),
])
def test_train_bad_flags(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    usage_error(capsys, tmp_path, train_main, [*TINY, "--out", str(out), *argv], *needles)
    assert not out.exists()


def test_train_init_from_a_policy_without_env_json(tmp_path, capsys):
    """A PS policy directory that records no task, against the default HalfCheetah 2x3: its 3 agents
    cannot fit, and the fix is to name the task."""
    make_policy(tmp_path / "src", adapters=False)
    out = tmp_path / "out"
    usage_error(capsys, tmp_path, train_main, ["--init-from", str(tmp_path / "src"), "--out", str(out), *TINY],
                "agent_2 obs 6 act 2", "pass the task it was trained on with --env.* flags")
    assert not out.exists()


@pytest.mark.parametrize("flags,needles", [
    (["--env.scenario", "Cheetah"], ["MaMuJoCo cannot build Cheetah", "--env.scenario HalfCheetah"]),
    (["--env.agent-conf", "7x9", "--env.workers", "1"], ["cannot build HalfCheetah '7x9'", "--env.agent-conf 2x3"]),
])
def test_train_unknown_task(tmp_path, capsys, flags, needles):
    """Also from a worker process (--env.workers 1): the parent reports the worker's user error as is."""
    out = tmp_path / "out"
    usage_error(capsys, tmp_path, train_main, [*TINY, "--out", str(out), *flags], *needles)
    assert not out.exists()


def test_train_seps_assignment_of_wrong_length(tmp_path, capsys):
    out = tmp_path / "out"
    usage_error(capsys, tmp_path, train_main,
                [*TINY, "--out", str(out), "--mode", "seps", "--seps.assignment", "0,1,1"],
                "--seps.assignment 0,1,1 must give a group for each of the 2 agents")
    assert not out.exists()


def test_train_out_holding_another_run(ps_run, capsys):
    usage_error(capsys, ps_run.parent, train_main, [*TINY, "--out", str(ps_run), "--seed", "7"],
                "already holds a run", f"--resume {ps_run}", "new --out")


def test_train_console_script_exit_status(tmp_path):
    """The installed `lorasa-train` entry point: status 2, one line, no traceback."""
    exe = Path(sys.executable).with_name("lorasa-train")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "training.cli"]
    r = subprocess.run(cmd + ["--resume", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"lorasa-train: error: --resume {tmp_path / 'missing'}: no such directory; pass the --out directory "
        "of an earlier lorasa-train run, or start a new run with --out"]


# --- lorasa-eval ------------------------------------------------------------------------------------

CHEETAH_ENV = {"kind": "mamujoco", "scenario": "HalfCheetah", "agent_conf": "2x3", "agent_obsk": 1,
               "episode_limit": 40}


def cheetah_policy(directory: Path, env_json: bool = True) -> Path:
    make_policy(directory, obs=(12, 12), act=(3, 3), hidden=16)
    if env_json:
        (directory / "env.json").write_text(json.dumps({"env": CHEETAH_ENV}))
    return directory


def merged_export(src: Path, out: Path, agents=None) -> Path:
    from exporters import ExportConfig, export_policy
    report = export_policy(ExportConfig(src, out, merge=True, formats=("safetensors",), agents=agents,
                                        steps=20, envs=2, progress=False))
    assert report.ok
    return out


def test_eval_missing_dir(tmp_path, capsys):
    usage_error(capsys, tmp_path, eval_main, [str(tmp_path / "nope")], "no such directory",
                "pass a policy directory written by lorasa-train")


def test_eval_dir_that_is_no_policy(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    usage_error(capsys, tmp_path, eval_main, [str(tmp_path / "d")], "is not a policy",
                "pass a directory written by lorasa-train")


def test_eval_corrupt_policy(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "policy.json").write_text("{not json")
    (tmp_path / "d" / "env.json").write_text(json.dumps({"env": CHEETAH_ENV}))
    usage_error(capsys, tmp_path, eval_main, [str(tmp_path / "d"), "--episodes", "1"], "policy.json")


def test_eval_policy_without_env_json_names_the_flags(tmp_path, capsys):
    p = cheetah_policy(tmp_path / "p", env_json=False)
    usage_error(capsys, tmp_path, eval_main, [str(p)], "records no task",
                "--env.kind mamujoco --env.scenario HalfCheetah --env.agent-conf 2x3")


def test_eval_policy_that_does_not_fit_the_env(tmp_path, capsys):
    p = cheetah_policy(tmp_path / "p")
    usage_error(capsys, tmp_path, eval_main, [str(p), "--episodes", "1", "--env.agent-conf", "6x1"],
                "do not match env HalfCheetah 6x1", "--env.* flags")


def test_eval_unknown_task(tmp_path, capsys):
    p = cheetah_policy(tmp_path / "p")
    usage_error(capsys, tmp_path, eval_main, [str(p), "--episodes", "1", "--env.scenario", "Cheetah"],
                "MaMuJoCo cannot build Cheetah", "--env.scenario HalfCheetah")


def test_eval_bad_flag_values(tmp_path, capsys):
    p = cheetah_policy(tmp_path / "p")
    usage_error(capsys, tmp_path, eval_main, [str(p), "--episodes", "0"], "--episodes 0 must be >= 1", "--help")
    usage_error(capsys, tmp_path, eval_main, [str(p), "--episods", "3"], "did you mean --episodes?")
    usage_error(capsys, tmp_path, eval_main, [str(p), "--json", str(tmp_path / "no" / "r.json"),
                                              "--episodes", "1"], "does not exist; create it")


def test_eval_one_merged_agent_points_at_the_export(tmp_path, capsys):
    exp = merged_export(cheetah_policy(tmp_path / "p"), tmp_path / "export")
    usage_error(capsys, tmp_path, eval_main, [str(exp / "merged" / "agent_0"), "--episodes", "1"],
                "merged policy of agent_0 alone", f"evaluate the export directory {exp} instead")


def test_eval_export_missing_an_agent(tmp_path, capsys):
    exp = merged_export(cheetah_policy(tmp_path / "p"), tmp_path / "export", agents=("agent_0",))
    usage_error(capsys, tmp_path, eval_main, [str(exp), "--episodes", "1"],
                "no merged policy for agents ['agent_1']", "--merge (every agent)")


def test_eval_export_without_a_known_task(tmp_path, capsys):
    """An export whose source has no env.json: a one-line error naming the flags; with them it runs."""
    exp = merged_export(cheetah_policy(tmp_path / "p", env_json=False), tmp_path / "export")
    usage_error(capsys, tmp_path, eval_main, [str(exp), "--episodes", "1"],
                "records no task", "the export's source", "--env.kind mamujoco")
    assert eval_main([str(exp), "--episodes", "1", "--env.kind", "mamujoco", "--env.scenario", "HalfCheetah",
                      "--env.agent-conf", "2x3", "--env.episode-limit", "20", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["policy"]["episodes"] == 1


def test_eval_merged_export_acts_like_its_source(tmp_path):
    """HalfCheetah 2x3 (real MaMuJoCo): lorasa-eval runs the export directory's team, each agent's rows
    through its own merged policy, on the task of the export's source. Oracle: along a real trajectory
    (driven by the source, across an episode reset) the team's actions equal the source Engine's with
    adapters. (Whole-episode returns are not compared: MuJoCo contacts amplify 1e-6 float differences.)"""
    import numpy as np

    from lorasa_serve import Engine
    from training.envs import EnvConfig, make_vec_env
    from training.eval_targets import load_merged_team, merged_team_act_fn
    from training.evaluate import engine_act_fn

    src = cheetah_policy(tmp_path / "p")
    exp = merged_export(src, tmp_path / "export")
    assert not (exp / "env.json").exists()  # the task comes from the export's source
    assert eval_main([str(exp), "--episodes", "2", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["via"].startswith("merged per-agent policies") and res["env"] == CHEETAH_ENV
    assert res["env_from"] == f"the export's source {src.resolve()}/env.json"
    assert res["policy"]["episodes"] == 2 and res["policy"]["mean_length"] == 40
    assert np.isfinite(res["policy"]["mean_return"])

    venv = make_vec_env(EnvConfig(**CHEETAH_ENV), n_envs=2, workers=0)
    team = merged_team_act_fn(load_merged_team(exp)[1], venv.info)
    oracle = engine_act_fn(Engine.from_dir(src, device="cpu", mode="lora"), venv.info, 2)
    step, s_team, s_ref, reset, worst = venv.reset(3), None, None, np.ones(2, bool), 0.0
    for _ in range(50):  # episodes end at 40: the state reset path runs too
        a_team, s_team = team(step.obs, step.avail, s_team, reset)
        a_ref, s_ref = oracle(step.obs, step.avail, s_ref, reset)
        worst = max(worst, float(np.abs(a_team - a_ref).max()))
        step = venv.step(a_ref)
        reset = step.done
    venv.close()
    assert worst < 1e-4


def test_grid_restarts_unfinished_runs(tmp_path):
    """lorasa-report run retries an unfinished run: from its checkpoint with --resume, else afresh with every
    file of the killed attempt dropped (a fresh lorasa-train refuses an --out that holds a run); a run that
    resuming cannot finish properly (finished already, or past a snapshot step whose snapshot is missing) is
    moved aside to <run>.stale-<n> and trained afresh."""
    from training.grid import Grid, _restart_args
    from training.rundir import check_fresh_out
    (tmp_path / "g.toml").write_text(GRID.format(methods='"mappo:ps", "mappo:lorasa"'))
    ps = Grid.load(tmp_path / "g.toml").runs[0]  # snapshot at 40

    def run_dir(name: str, steps: int | None, *files: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        if steps is not None:
            (d / "train_state").mkdir()
            (d / "train_state" / "state.json").write_text(json.dumps({"counters": {"env_steps": steps}}))
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text("x")
        return d

    early = run_dir("early", 20, "metrics.csv", "policy.json")
    assert _restart_args(early, ps) == ["--resume", str(early)]
    past = run_dir("past", 60, "metrics.csv", "policy.json", "snapshots/40/policy.json")
    assert _restart_args(past, ps) == ["--resume", str(past)]
    # killed between policy.json and train_state/state.json at its first checkpoint
    partial = run_dir("partial", None, "metrics.csv", "policy.json", "backbone.safetensors", "env.json",
                      "adapters/agent_0.safetensors", "tb/events", "train.log", "run.json")
    assert _restart_args(partial, ps) == [] and sorted(p.name for p in partial.iterdir()) == ["train.log"]
    check_fresh_out(partial)  # no error now
    for name, steps, files in (("lost", 60, ["metrics.csv"]), ("finished", 80, ["summary.json"]),
                               ("unreadable", 20, [])):
        d = run_dir(name, steps, *files)
        if name == "unreadable":
            (d / "train_state" / "state.json").write_text("{")
        assert _restart_args(d, ps) == [] and list(d.iterdir()) == []
        assert (tmp_path / f"{name}.stale-1" / "train_state" / "state.json").is_file()
        check_fresh_out(d)
    lost = tmp_path / "lost"
    lost.rmdir()
    run_dir("lost", 80, "summary.json")  # a second stale copy gets the next free number
    assert _restart_args(lost, ps) == [] and (tmp_path / "lost.stale-2" / "summary.json").is_file()


# --- lorasa-report ----------------------------------------------------------------------------------

GRID = """seeds = [1]
total_steps = 80
switch_step = 40
[[scenarios]]
preset = "halfcheetah_2x3"
methods = [{methods}]
"""


def report_args(tmp_path: Path, grid: Path, command: str = "write") -> list[str]:
    return [command, str(grid), "--runs", str(tmp_path), "--out", str(tmp_path / "report")]


def test_report_missing_grid_file(tmp_path, capsys):
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, tmp_path / "nope.toml"),
                "does not exist", "pass the path of a grid TOML")


def test_report_malformed_toml(tmp_path, capsys):
    (tmp_path / "g.toml").write_text("seeds = [1\n")
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, tmp_path / "g.toml", "run"),
                "is not valid TOML", "fix the file")


@pytest.mark.parametrize("methods,needles", [
    ('"mappo:lorsa"', ["unknown method 'mappo:lorsa'", "write <mappo|a2po>:<", 'e.g. "mappo:lorasa"']),
    ('"ppo:ps"', ["unknown method 'ppo:ps'"]),
    ('"mappo:lorasa"', ["need their base runs", "add ['halfcheetah_2x3/mappo-ps/seed1']"]),
])
def test_report_bad_methods(tmp_path, capsys, methods, needles):
    (tmp_path / "g.toml").write_text(GRID.format(methods=methods))
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, tmp_path / "g.toml", "run"), *needles)


def test_report_run_with_overrides_lorasa_train_rejects(tmp_path, capsys):
    (tmp_path / "g.toml").write_text(GRID.format(methods='"mappo:ps"') + 'overrides = { "eval-evry" = 3 }\n')
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, tmp_path / "g.toml", "run"),
                "run halfcheetah_2x3/mappo-ps/seed1: lorasa-train rejects its flags (unrecognized arguments: "
                "--eval-evry=3 (did you mean --eval-every?))", "fix the grid's overrides")


def test_report_write_without_runs_or_committed_results(tmp_path, capsys):
    """`write` needs the runs root or the grid's committed compact results (test_report.py: the latter alone)."""
    (tmp_path / "g.toml").write_text(GRID.format(methods='"mappo:ps"'))
    usage_error(capsys, tmp_path, report_main,
                ["write", str(tmp_path / "g.toml"), "--runs", str(tmp_path / "gone"), "--out", str(tmp_path / "r")],
                f"--runs {tmp_path / 'gone'} does not exist and {tmp_path / 'g' / 'runs'} holds no compact results")


def test_report_bad_grid_keys_and_arguments(tmp_path, capsys):
    g = tmp_path / "g.toml"
    g.write_text(GRID.format(methods='"mappo:ps"').replace('"halfcheetah_2x3"', '"cheetah"'))
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, g), "unknown preset 'cheetah'", "use one of")
    g.write_text("seeds = [1]\n")
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, g), "missing keys", "add them")
    g.write_text(GRID.format(methods='"mappo:ps"'))
    usage_error(capsys, tmp_path, report_main, report_args(tmp_path, g) + ["--notes", str(tmp_path / "n.md")],
                "--notes", "drop --notes")
    usage_error(capsys, tmp_path, report_main, ["write", str(g), "--out", str(tmp_path / "r")],
                "the following arguments are required: --runs", "see lorasa-report write --help")
    usage_error(capsys, tmp_path, report_main, ["wrte", str(g)], "invalid choice: 'wrte'")


def test_eval_url_with_the_server_down_is_one_line(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shipped = str(Path(__file__).resolve().parents[1] / "policies" / "halfcheetah_2x3")
    usage_error(capsys, tmp_path, eval_main, [shipped, "--episodes", "1", "--url", f"http://127.0.0.1:{port}"],
                "--url", "cannot use the service", "make serve")


def test_runtime_user_errors_are_typed_one_liners(tmp_path):
    """Engine on a device that is not there, a policy directory that does not exist, a bare string as
    agent ids to the client: typed errors with one-line messages (no AssertionError, no silent split)."""
    from lorasa_serve import DeviceUnavailableError, Engine, NotRegularFileError
    from lorasa_serve.client import ClientInputError, PolicyClient
    import torch
    make_policy(tmp_path / "p")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="not available") as e:
            Engine.from_dir(tmp_path / "p", device="cuda")
        assert "\n" not in str(e.value)
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        Engine.from_dir(tmp_path / "p", device="tpu:0")
    with pytest.raises(NotRegularFileError, match="no such directory"):
        Engine.from_dir(tmp_path / "nope")
    with pytest.raises(ClientInputError, match=r"pass \['agent_0'\]"):
        PolicyClient("http://127.0.0.1:9").act("agent_0", [[0.0] * 6])
