"""Vector envs over `SingleEnv`s: stepped in this process (`SerialVecEnv`) or in worker processes
(`SubprocVecEnv`, each worker a `SerialVecEnv` over its slice of the envs, all workers stepping at once)."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from typing import Callable

import numpy as np

from .base import EnvConfig, SingleEnv, Step, Transition

EnvFactory = Callable[[EnvConfig, int], SingleEnv]  # (config, env index) -> env


class SerialVecEnv:
    """E single envs stepped one after another, auto-reset, with episode bookkeeping."""

    def __init__(self, cfg: EnvConfig, factory: EnvFactory, n_envs: int, first_index: int = 0):
        self.envs = [factory(cfg, first_index + i) for i in range(n_envs)]
        self.info = self.envs[0].info
        self.n_envs = n_envs
        self._ret = np.zeros(n_envs)
        self._len = np.zeros(n_envs, np.int64)

    def reset(self, seed: int) -> Step:
        self._ret[:] = 0
        self._len[:] = 0
        trs = [env.reset(seed + i) for i, env in enumerate(self.envs)]
        return self._stack(trs, trs, np.zeros(self.n_envs, bool), self._ret.copy(), self._len.copy())

    def step(self, actions: np.ndarray) -> Step:
        """actions [E, N, act_max] float or [E, N] int."""
        trs, starts = [], []
        done = np.zeros(self.n_envs, bool)
        ep_ret, ep_len = np.zeros(self.n_envs), np.zeros(self.n_envs, np.int64)
        for i, env in enumerate(self.envs):
            tr = env.step(actions[i])
            self._ret[i] += tr.reward
            self._len[i] += 1
            trs.append(tr)
            if tr.terminated or tr.truncated:
                done[i], ep_ret[i], ep_len[i] = True, self._ret[i], self._len[i]
                self._ret[i], self._len[i] = 0.0, 0
                starts.append(env.reset(None))
            else:
                starts.append(tr)
        return self._stack(starts, trs, done, ep_ret, ep_len)

    def _stack(self, now: list[Transition], ended: list[Transition], done: np.ndarray,
               ep_ret: np.ndarray, ep_len: np.ndarray) -> Step:
        return Step(obs=np.stack([t.obs for t in now]), state=np.stack([t.state for t in now]),
                    avail=np.stack([t.avail for t in now]),
                    reward=np.array([t.reward for t in ended], np.float32), done=done,
                    terminated=np.array([t.terminated for t in ended]) & done,
                    final_state=np.stack([t.state for t in ended]), ep_return=ep_ret, ep_length=ep_len,
                    ep_won=np.array([t.won for t in ended], np.float32))

    def close(self) -> None:
        for env in self.envs:
            env.close()


class WorkerTraceback(Exception):
    """The traceback of an error raised inside an env worker (the `__cause__` of the re-raised error)."""


class WorkerError:
    """An exception raised by an env worker (start, reset or step), sent to the parent, which re-raises
    it with its own type and message (or as a RuntimeError naming the type when it cannot be pickled)."""

    def __init__(self, exc: BaseException, worker: int, during: str):
        self.traceback = f"env worker {worker} failed to {during}:\n{traceback.format_exc()}"
        try:
            pickle.loads(pickle.dumps(exc))
            self.exc = exc
        except Exception:
            self.exc = RuntimeError(f"{type(exc).__name__}: {exc}")

    def raise_(self):
        raise self.exc from WorkerTraceback(self.traceback)


def _worker(conn, cfg: EnvConfig, factory: EnvFactory, n_envs: int, first_index: int, worker: int) -> None:
    try:
        venv = SerialVecEnv(cfg, factory, n_envs, first_index)
    except Exception as e:  # report to the parent instead of dying silently
        conn.send(WorkerError(e, worker, "start"))
        return
    conn.send(venv.info)
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd not in ("step", "reset"):
                break
            try:
                conn.send(venv.step(arg) if cmd == "step" else venv.reset(arg))
            except Exception as e:  # the parent re-raises it (and closes every worker)
                conn.send(WorkerError(e, worker, cmd))
    except (EOFError, OSError, KeyboardInterrupt):  # the parent is gone
        pass
    finally:
        venv.close()


class SubprocVecEnv:
    """E envs split over W worker processes; one step sends every worker its actions, then gathers."""

    def __init__(self, cfg: EnvConfig, factory: EnvFactory, n_envs: int, workers: int):
        workers = max(1, min(workers, n_envs))
        sizes = [n_envs // workers + (w < n_envs % workers) for w in range(workers)]
        self.bounds = np.cumsum([0] + sizes)
        ctx = mp.get_context("spawn")  # no fork of a process holding torch / MuJoCo threads
        self.conns, self.procs = [], []
        for w in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, cfg, factory, sizes[w], int(self.bounds[w]), w),
                            daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        infos = [self._recv(c) for c in self.conns]
        self.info = infos[0]
        self.n_envs = n_envs

    def reset(self, seed: int) -> Step:
        for w, c in enumerate(self.conns):
            c.send(("reset", seed + int(self.bounds[w])))
        return _concat([self._recv(c) for c in self.conns])

    def step(self, actions: np.ndarray) -> Step:
        for w, c in enumerate(self.conns):
            c.send(("step", actions[self.bounds[w]:self.bounds[w + 1]]))
        return _concat([self._recv(c) for c in self.conns])

    def _recv(self, conn):
        try:
            msg = conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError("an env worker process died (see its traceback above)") from None
        if isinstance(msg, WorkerError):
            self.close()
            msg.raise_()
        return msg

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()

    def __del__(self):
        if getattr(self, "procs", None) and any(p.is_alive() for p in self.procs):
            self.close()


def _concat(steps: list[Step]) -> Step:
    if len(steps) == 1:
        return steps[0]
    return Step(**{k: np.concatenate([getattr(s, k) for s in steps]) for k in Step.__dataclass_fields__})
