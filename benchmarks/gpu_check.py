"""GPU check: the CUDA tests, `lorasa-bench --device cuda` and ONNX CUDA-provider parity, in under
8 minutes, every result written into one folder.

    python -m benchmarks.gpu_check RESULTS        # from the repository root, on a machine with a GPU

What it assumes of the machine (nothing is downloaded: it reads this repository only):
* this repository, with a Python environment that has its dependencies and pytest: the venv built by
  `make install` or `pip install -e '.[onnx,dev]'` (the repository root is put on PYTHONPATH for every
  step, so an environment where it is not installed works too);
* torch 2.13.0 (the tested version) built for CUDA. PyPI's Linux wheel is the CUDA 12 build:
  `pip install torch==2.13.0` (or one of https://download.pytorch.org/whl/cu12x, for the driver's CUDA).
  With a CPU build, or no GPU visible, the check prints one line saying so and exits 2, writing nothing;
* for the ONNX step, onnxruntime-gpu INSTEAD of onnxruntime: they install the same module and must never
  both be installed (`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`), plus onnx and
  onnxscript to export. Without onnxruntime-gpu the step is reported as skipped (with that command);
  both installed, or no CUDAExecutionProvider, is a failure.

Steps, each in its own process with its own timeout (the whole check stays under 8 minutes):
  environment  torch, CUDA, the GPU, which onnxruntime is installed and its providers -> env.json
  tests        pytest -k cuda over the engine's oracle tests (cuda cases exist only where CUDA does:
               tests/conftest.py DEVICES) -> tests.log, tests.xml
  bench        lorasa-bench --device cuda --quick (the engine's methods) -> bench.log, bench.json
  onnx         policies/halfcheetah_2x3 exported to ONNX; OnnxEngine on CUDAExecutionProvider and the
               Engine on CUDA against the CPU Engine over recurrent steps, deterministic and seeded
               sampling -> onnx.log, onnx.json
  summary      every step's status, seconds and findings -> summary.json, summary.txt (also printed)
Exit status: 0 when no step failed (a skipped ONNX step included), 1 when one failed or timed out,
2 for a usage error or a machine without CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, UsageError, run_cli
from lorasa_serve.errors import DeviceUnavailableError

ROOT = Path(__file__).resolve().parent.parent  # the repository: tests/ and policies/ are read from it
POLICY = ROOT / "policies" / "halfcheetah_2x3"
CUDA_TESTS = ("tests/test_engine.py", "tests/test_engine_paths.py", "tests/test_log_std_offset.py",
              "tests/test_agent_onehot.py", "tests/test_device_inputs.py")
BENCH_METHODS = "ps,engine-lora,engine-merged,engine-auto,per-agent,nps"  # ONNX: its own step, on CUDA
TOTAL_S = 470  # the whole check, start-ups included, stays under 8 minutes
TIMEOUT_S = {"tests": 210, "bench": 150, "onnx": 100}  # each step at most (less when less is left)
ONNX_STEPS, ONNX_ENVS = 20, 4  # recurrent steps; rows per agent per step
ENGINE_ATOL = 1e-5  # torch on CUDA vs CPU: float32 matmuls at full precision (TF32 is off by default)
ONNX_ATOL = 1e-3  # onnxruntime's CUDA provider may use TF32 matmuls (its default on Ampere and later)
ORT_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


@dataclass
class Step:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    detail: str  # one line: what it found, or why it failed or was skipped
    files: list[str] = field(default_factory=list)


# --- the environment ------------------------------------------------------------------------------
def environment() -> dict:
    """torch, CUDA and GPU facts (the installed onnxruntime is added by `run`: `onnxruntime_info`)."""
    import torch
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1))
    return env


def no_cuda_reason(env: dict) -> str:
    if env["torch_cuda"] is None:
        return (f"torch {env['torch']} is a CPU build: install its CUDA build (pip install torch==2.13.0, "
                "PyPI's Linux wheel) on a machine with an NVIDIA GPU")
    return f"torch {env['torch']} (CUDA {env['torch_cuda']}) sees no GPU (driver, CUDA_VISIBLE_DEVICES?)"


def onnxruntime_info() -> dict:
    """Which onnxruntime distributions are installed (onnxruntime and onnxruntime-gpu must never both
    be: they install the same module) and the providers the module offers."""
    info: dict = {"installed": {}}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            info["installed"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime
        info["providers"] = onnxruntime.get_available_providers()
    except Exception as e:  # noqa: BLE001 - absent or broken: reported, never fatal here
        info["import_error"] = f"{type(e).__name__}: {e}"
    return info


# --- steps ----------------------------------------------------------------------------------------
def run_step(name: str, cmd: list[str], out: Path, timeout: float) -> tuple[str, float]:
    """cmd in its own process group, output to out/<name>.log -> (passed | failed | timeout, seconds).
    On timeout the whole group is killed (pytest's and onnxruntime's threads and children too)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n")
            return "timeout", time.monotonic() - t0
    return ("passed" if rc == 0 else "failed"), time.monotonic() - t0


def tests_step(out: Path, timeout: float) -> Step:
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider",
           f"--junitxml={out / 'tests.xml'}", *CUDA_TESTS]
    status, secs = run_step("tests", cmd, out, timeout)
    detail = junit_counts(out / "tests.xml")
    if status == "failed" and detail.startswith("0 tests"):
        detail = "no cuda test was collected: CUDA not visible inside pytest? (see tests.log)"
    return Step("tests", status, secs, detail, ["tests.log", "tests.xml"])


def junit_counts(path: Path) -> str:
    """'N tests: F failed, E errors, S skipped' from pytest's JUnit XML (or why it cannot be read)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no test report ({type(e).__name__}): see tests.log"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return f"{n['tests']} tests: {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def bench_step(out: Path, timeout: float) -> Step:
    cmd = [sys.executable, "-m", "benchmarks.engine", "--device", "cuda", "--quick",
           "--methods", BENCH_METHODS, "--out", str(out / "bench.json")]
    status, secs = run_step("bench", cmd, out, timeout)
    try:
        rep = json.loads((out / "bench.json").read_text())
        ts = rep["team_step"]
        detail = (f"{len(rep['results'])} cells; team step of {ts['agents']} agents: Engine.act p50 "
                  f"{ts['engine-auto']['p50_us']:.0f} us (PS backbone alone {ts['ps']['p50_us']:.0f} us)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = f"no bench.json ({type(e).__name__}): see bench.log"
    return Step("bench", status, secs, detail, ["bench.log", "bench.json"])


def onnx_step(out: Path, timeout: float, ort: dict) -> Step:
    installed, providers = ort["installed"], ort.get("providers", [])
    if len(installed) == 2:
        return Step("onnx", "failed", 0.0, f"both onnxruntime and onnxruntime-gpu are installed {installed}: "
                                           f"they overwrite one module; {ORT_FIX}")
    if "onnxruntime-gpu" not in installed:
        have = f"onnxruntime {installed['onnxruntime']} (CPU)" if installed else "no onnxruntime"
        return Step("onnx", "skipped", 0.0, f"{have} installed, not onnxruntime-gpu: {ORT_FIX}")
    if "CUDAExecutionProvider" not in providers:
        return Step("onnx", "failed", 0.0, f"onnxruntime-gpu {installed['onnxruntime-gpu']} offers no "
                                           f"CUDAExecutionProvider ({ort.get('import_error') or providers})")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", str(out), "--onnx-child"]
    status, secs = run_step("onnx", cmd, out, timeout)
    try:
        res = json.loads((out / "onnx.json").read_text())
        detail = (f"{res['steps']} recurrent steps x {res['rows']} rows, providers {res['providers']}: "
                  f"max |diff| vs the CPU Engine: OnnxEngine {res['max_diff']['onnx']:.1e} (atol {ONNX_ATOL:g}), "
                  f"Engine on CUDA {res['max_diff']['engine']:.1e} (atol {ENGINE_ATOL:g})")
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = f"no onnx.json ({type(e).__name__}): see onnx.log"
    return Step("onnx", status, secs, detail, ["onnx.log", "onnx.json"])


# --- the ONNX step's body (run in its own process: --onnx-child) -------------------------------------
def parity(policy: Path, device: str, providers: list[str], steps: int, envs: int) -> dict:
    """The Engine on `device` and OnnxEngine on `providers` against the CPU Engine over `steps`
    recurrent steps of `envs` rows per agent (random zero-padded observations, random resets; each
    backend carries its own state): deterministic actions, next states and seeded sampled actions
    (the same CPU seed: the same noise on every backend) -> max |diff| per backend and the providers
    the ONNX sessions really run on."""
    import numpy as np
    import torch

    from exporters import onnx_engine_from_policy
    from lorasa_serve import Engine
    ref = Engine.from_dir(policy, device="cpu", mode="lora")
    eng = Engine.from_dir(policy, device=device, mode="lora")
    onnx = onnx_engine_from_policy(policy, providers=providers)
    used = sorted({p for s in onnx._graphs.values() for p in s.get_providers()}, key=providers.index)
    spec, rng = ref.spec, np.random.default_rng(0)
    ids = [a for _ in range(envs) for a in spec.agent_ids]
    B = len(ids)
    h = {"cpu": None, "onnx": None, "engine": None}
    diffs = {"onnx": 0.0, "engine": 0.0}
    for t in range(steps):
        obs = rng.standard_normal((B, spec.obs_max)).astype(np.float32)
        for i, a in enumerate(ids):
            obs[i, spec.agent(a).obs_dim:] = 0
        reset = np.ones(B, bool) if t == 0 else rng.random(B) < 0.1
        inputs = {"cpu": (ref, obs, reset), "onnx": (onnx, obs, reset),  # host data, as an env gives it
                  "engine": (eng, torch.from_numpy(obs).to(device), torch.from_numpy(reset).to(device))}
        outs = {}
        for name, (be, o, r) in inputs.items():
            det = be.act(ids, o, h[name], r)
            sampled = be.act(ids, o, h[name], r, deterministic=False, generator=torch.Generator().manual_seed(t))
            h[name] = det.state
            outs[name] = [x.cpu().double() for x in (det.actions, det.state, sampled.actions)]
        for name in diffs:
            d = max(float((x - y).abs().max()) for x, y in zip(outs[name], outs["cpu"]))
            diffs[name] = max(diffs[name], d)
    return {"policy": str(policy), "device": device, "providers": used, "steps": steps, "rows": B,
            "max_diff": diffs}


def onnx_child(out: Path) -> int:
    """The onnx step: parity on CUDA -> out/onnx.json; 0 if within tolerance on CUDAExecutionProvider."""
    import torch  # noqa: F401 - first: its CUDA libraries are then loaded for onnxruntime too
    import onnxruntime
    if hasattr(onnxruntime, "preload_dlls"):  # onnxruntime >= 1.21: the nvidia-* wheels' CUDA and cuDNN
        onnxruntime.preload_dlls()
    res = parity(POLICY, "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], ONNX_STEPS, ONNX_ENVS)
    res["ok"] = (res["providers"][:1] == ["CUDAExecutionProvider"] and res["max_diff"]["onnx"] <= ONNX_ATOL
                 and res["max_diff"]["engine"] <= ENGINE_ATOL)
    (out / "onnx.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


# --- the command ----------------------------------------------------------------------------------
def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="gpu_check", description=__doc__)
    ap.add_argument("results", type=Path, help="folder for every result (made if missing; files in it are replaced)")
    ap.add_argument("--onnx-child", action="store_true",
                    help="internal: run the ONNX parity step in this process (the script starts it so)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.results.exists() and not args.results.is_dir():
        raise UsageError(f"{args.results} is a file: pass a folder for the results")
    return args


def summarize(out: Path, env: dict, steps: list[Step], seconds: float) -> str:
    """Write summary.json and summary.txt -> the text."""
    lines = [f"gpu_check {env['date']}: {env.get('gpu', '?')} (capability {env.get('capability', '?')}), "
             f"torch {env['torch']} CUDA {env['torch_cuda']}, onnxruntime {env['onnxruntime']['installed'] or 'none'}"]
    lines += [f"  {s.name:6s} {s.status:8s} {s.seconds:6.1f} s  {s.detail}" for s in steps]
    lines.append(f"  total {seconds:.0f} s; files in {out}")
    text = "\n".join(lines) + "\n"
    (out / "summary.json").write_text(json.dumps({"environment": env, "seconds": seconds,
                                                  "steps": [asdict(s) for s in steps]}, indent=1))
    (out / "summary.txt").write_text(text)
    return text


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.results
    if args.onnx_child:
        return onnx_child(out)
    t0 = time.monotonic()
    env = environment()
    if not env["cuda_available"]:
        raise DeviceUnavailableError(f"no CUDA here, nothing checked: {no_cuda_reason(env)}")
    env["onnxruntime"] = onnxruntime_info()
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    steps: list[Step] = []
    for name, step in (("tests", tests_step), ("bench", bench_step),
                       ("onnx", lambda o, t: onnx_step(o, t, env["onnxruntime"]))):
        left = TOTAL_S - (time.monotonic() - t0)
        steps.append(step(out, min(TIMEOUT_S[name], left)) if left > 5 else
                     Step(name, "timeout", 0.0, "no time left in the 8-minute budget"))
    print(summarize(out, env, steps, time.monotonic() - t0), end="")
    return 1 if any(s.status in ("failed", "timeout") for s in steps) else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("gpu_check", run, argv)


if __name__ == "__main__":
    sys.exit(main())
