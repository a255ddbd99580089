"""`lorasa-report run GRID --ray ADDRESS|auto`: the grid's runs as Ray tasks across a cluster, scheduled by
`grid.run_grid` (the same dependency, resume and compact-results logic as local runs; only the launcher
differs). Nodes share no files: a task gets what its run needs through the object store (the run
directory as the driver has it, so a killed run resumes; a LoRA run's base snapshot), trains it with
lorasa-train in a private temp dir on its node, and sends the whole run directory back (no tb/). The driver
swaps it into the runs root in one rename, so a run is there entirely or not at all.

A task needs 1 CPU, or its --env.workers; Ray places it on any node with that many free. A task whose
worker or node dies is retried (`retries`, from scratch: the temp dir is new); after the last try the run
is reported FAILED and its directory in the runs root is left as it was before the launch.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lorasa_serve.cli import UsageError, one_line

from .grid import Run, requested
from .ray_support import connect

SKIP = ("tb",)  # not shipped back (the grid trains with --no-tensorboard anyway)


def read_tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of the regular files under `root` (SKIP dirs left out)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not p.is_symlink() and rel.parts[0] not in SKIP:
            out[rel.as_posix()] = p.read_bytes()
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"refusing to write {rel!r} outside {root}")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def swap_in(out: Path, files: dict[str, bytes]) -> None:
    """Replace run directory `out` by `files`: written beside it, then renamed into place."""
    incoming, old = out.with_name(out.name + ".incoming"), out.with_name(out.name + ".replaced")
    for d in (incoming, old):
        shutil.rmtree(d, ignore_errors=True)
    write_tree(incoming, files)
    if out.exists():
        out.rename(old)
    incoming.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _die_with_parent() -> None:
    """In the lorasa-train child: killed when the Ray worker that started it dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


TMP_PREFIX = "lorasa-grid-"  # a task's runs root on its node: <tmp>/lorasa-grid-<worker pid>-<random>


def _remove_stale_dirs() -> None:
    """Remove the runs roots left by tasks whose worker was killed (its pid is gone)."""
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        try:
            pid = int(d.name[len(TMP_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def train_on_node(key: str, args: list[str], run_files: dict[str, bytes], base_rel: str | None,
                  base_files: dict[str, bytes]) -> dict:
    """The Ray task: run `key` (lorasa-train flags `args`, paths under "{runs}") in a temp runs root on this
    node -> {rc, files (its run directory), node}."""
    import ray

    import lorasa_serve
    import training
    _remove_stale_dirs()
    root = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-"))
    try:
        out = root / key
        out.mkdir(parents=True)
        write_tree(out, run_files)
        if base_rel:
            write_tree(root / base_rel, base_files)
        cmd = [sys.executable, "-m", "training.cli", *[a.replace("{runs}", str(root)) for a in args],
               "--out", str(out)]
        paths = {str(Path(m.__file__).parent.parent) for m in (training, lorasa_serve)}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([*sorted(paths), os.environ.get("PYTHONPATH", "")])}
        with open(out / "train.log", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent).returncode
        return {"rc": rc, "files": read_tree(out), "node": ray.get_runtime_context().get_node_id()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpus_of(run: Run) -> int:
    """CPUs a run asks for: 1, or its env worker processes."""
    return max(1, int(requested(run).get("env.workers", 0)))


class RayLauncher:
    """`run_grid`'s launcher for a Ray cluster: every ready run submitted at once, Ray queues them (check
    `check_cluster_fits` first: a task no node can hold would wait forever)."""

    poll_s = 0.5

    def __init__(self, runs_root: Path, address: str, retries: int = 2):
        self.ray = ray = connect(address)
        self.runs_root, self.retries = runs_root, retries
        self.task = ray.remote(train_on_node)
        self.running: dict[str, object] = {}  # key -> ObjectRef
        self.largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)

    def free(self) -> bool:
        return True

    def launch(self, run: Run, out: Path, args: list[str]) -> None:
        """Submit `run` with lorasa-train flags `args` (resolved against the runs root: its paths there are
        mapped to the task's own runs root on its node)."""
        root = str(self.runs_root)
        node_args = ["{runs}" + a[len(root):] if a == root or a.startswith(root + "/") else a for a in args]
        base_rel, base_files = None, {}
        if "--init-from" in args:
            snap = Path(args[args.index("--init-from") + 1])
            base_rel, base_files = snap.relative_to(self.runs_root).as_posix(), read_tree(snap)
        self.running[run.key] = self.task.options(num_cpus=cpus_of(run), max_retries=self.retries,
                                                  name=f"lorasa-train {run.key}").remote(
            run.key, node_args, read_tree(out), base_rel, base_files)

    def poll(self) -> list[tuple[str, str | None]]:
        ended = []
        refs = {ref: key for key, ref in self.running.items()}
        if refs:
            done, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in done:
                key = refs[ref]
                del self.running[key]
                ended.append((key, self._collect(key, ref)))
        return ended

    def _collect(self, key: str, ref) -> str | None:
        """Bring the run's directory home; None if it finished, else why it failed."""
        try:
            res = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            return (f"its Ray task failed after {self.retries + 1} tries ({one_line(e, 300)}); "
                    f"{self.runs_root / key} is as it was before the launch")
        swap_in(self.runs_root / key, res["files"])
        if res["rc"] != 0:
            return f"exit {res['rc']} on Ray node {res['node'][:12]}; see {self.runs_root / key / 'train.log'}"
        return None


def check_cluster_fits(runs: list[Run], launcher: RayLauncher) -> None:
    """UsageError (one line) if a run asks for more CPUs than any node of the cluster has."""
    worst = max(runs, key=cpus_of, default=None)
    if worst is not None and cpus_of(worst) > launcher.largest:
        raise UsageError(f"run {worst.key} needs {cpus_of(worst)} CPUs (--env.workers) but the largest node of "
                         f"the Ray cluster has {launcher.largest:g}: lower env.workers in the grid's overrides "
                         "or add bigger nodes")
