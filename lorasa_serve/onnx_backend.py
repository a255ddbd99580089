"""Serve an exported ONNX directory through onnxruntime with the Engine's `act` interface.

    eng = OnnxEngine.from_dir("export/")               # written by `lorasa-export`
    out = eng.act(["agent_0", "agent_1"], obs, state, reset)   # ActResult, as Engine.act

When the export's manifest lists a verified `onnx/multi_agent.onnx`, that one graph serves mixed
batches natively; otherwise rows are grouped per agent over `onnx/<agent_id>.onnx` (merged weights). The graphs return
raw heads and next states; actions and log-probs come from `lorasa_serve.distributions`, the same
code the Engine uses, so deterministic and seeded sampled actions match the Engine's.

onnxruntime is optional (`pip install 'lorasa-serve[onnx]'`, or `[gpu]` for onnxruntime-gpu).
Providers: "cpu" (default), "auto" (CUDA when onnxruntime lists it, else CPU, logged), or a list.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import onnx_contract as contract
from . import protocol
from .protocol import ActRequest, ActResult
from .distributions import categorical_act, dim_mask, gaussian_act
from .errors import ArtifactError, CorruptFileError, DigestMismatchError, InputError, LorasaError
from .files import read_file
from .onnx_contract import MANIFEST, SPEC_FILE
from .spec import PolicySpec

log = logging.getLogger("lorasa_serve.onnx")
CPU = torch.device("cpu")
GPU_PROVIDERS = ("CUDAExecutionProvider",)
MAX_GRAPH_BYTES = 2 << 30  # protobuf's limit for one ONNX file (weights are embedded: no external data)


class OnnxRuntimeMissingError(LorasaError, ImportError):
    """onnxruntime is not installed."""


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissingError("the ONNX backend needs onnxruntime: pip install "
                                      "'lorasa-serve[onnx]' (or '[gpu]' for onnxruntime-gpu)") from None
    return onnxruntime


def select_providers(providers: str | Sequence[str] = "cpu") -> list[str]:
    """'cpu' -> CPU; 'auto' -> CUDA first when onnxruntime lists it (logged either way); a list as is."""
    ort = _ort()
    available = ort.get_available_providers()
    if isinstance(providers, str):
        if providers == "cpu":
            return ["CPUExecutionProvider"]
        if providers != "auto":
            raise ValueError(f"providers must be 'cpu', 'auto' or a list, not {providers!r}")
        gpu = [p for p in GPU_PROVIDERS if p in available]
        if gpu:
            log.info("onnxruntime providers: %s then CPU", gpu)
            return gpu + ["CPUExecutionProvider"]
        log.info("no GPU provider in onnxruntime (%s): using CPUExecutionProvider", available)
        return ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"providers {missing} not available; onnxruntime has {available}")
    return list(providers)


def make_session(model: str | Path | bytes, providers: str | Sequence[str] = "cpu",
                 threads: int | None = None, name: str | None = None):
    """An InferenceSession; logs when a requested provider silently fell back to CPU. A path is read
    here (regular files only, size bounded: never handed to onnxruntime to open); `name` names the
    bytes' file in errors."""
    ort = _ort()
    wanted = select_providers(providers)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # idle onnxruntime threads otherwise spin for a while after each run, stealing the CPU from
    # whatever runs next in the process (torch, the HTTP server): measured 2-3x slower torch calls
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not isinstance(model, (bytes, bytearray)):
        name, model = str(model), read_file(model, MAX_GRAPH_BYTES)
    try:
        sess = ort.InferenceSession(bytes(model), sess_options=opts, providers=wanted)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CorruptFileError(name or "<onnx bytes>", f"onnxruntime cannot load the model: {e}") from None
    got = sess.get_providers()
    if wanted[0] not in got:
        log.warning("onnxruntime fell back from %s to %s", wanted[0], got)
    return sess


class OnnxEngine:
    """Engine-compatible `act` over exported ONNX graphs (see module doc)."""

    def __init__(self, spec: PolicySpec, sessions: dict[str, object], multi_agent: bool,
                 log_std: np.ndarray | None):
        self.spec = spec
        self.multi_agent = multi_agent
        self._graphs = sessions  # contract.MULTI_AGENT or agent id -> its onnxruntime InferenceSession
        self._table = protocol.AgentTable(spec)  # what the protocol's checks read
        self._act_dims = torch.tensor([a.act_dim for a in spec.agents])
        self._log_std = None if log_std is None else torch.from_numpy(log_std)
        self.device = CPU
        self._head = contract.head_output(spec)  # the graph output read as the raw head

    @classmethod
    def from_dir(cls, export_dir: str | Path, providers: str | Sequence[str] = "cpu",
                 threads: int | None = None) -> "OnnxEngine":
        """Serve the graphs that the directory's manifest.json lists as verified by its last export
        (files left by older exports into the same directory are ignored)."""
        d = Path(export_dir)
        spec = PolicySpec.load(d / SPEC_FILE)
        manifest = contract.read_manifest(d)
        verified = contract.verified_graphs(manifest)
        multi = contract.MULTI_AGENT in verified
        if multi:
            files = {contract.MULTI_AGENT: d / contract.graph_file(contract.MULTI_AGENT)}
        else:
            missing = [a for a in spec.agent_ids if a not in verified]
            if missing:
                raise ArtifactError(d / MANIFEST, f"no verified ONNX graph for agents {missing} "
                                                  f"(export with --format onnx, all agents)")
            files = {a: d / contract.graph_file(a) for a in spec.agent_ids}
        sessions = {k: make_session(_graph_bytes(d, f, manifest), providers, threads, str(f))
                    for k, f in files.items()}
        for f, sess in zip(files.values(), sessions.values()):
            _check_graph_spec(f, sess, spec)
        log_std = contract.manifest_log_std(d, manifest, spec) if spec.action == "gaussian" else None
        return cls(spec, sessions, multi, log_std)

    @property
    def agent_ids(self) -> list[str]:
        return self.spec.agent_ids

    def agent_index(self, agent_ids: Sequence[str]) -> np.ndarray:
        """Agent ids -> integer indices accepted by `act` in place of ids (skips the lookup)."""
        if isinstance(agent_ids, np.ndarray) and agent_ids.dtype.kind in "iu":
            raise InputError("agent_index takes agent id strings, not indices")
        return protocol.agent_indices(self._table, _host(agent_ids))

    # --- acting -------------------------------------------------------------------------------
    def forward(self, agent_ids, obs, state=None, reset=None, avail=None
                ) -> tuple[Tensor, Tensor | None]:
        """Head [B, act_max] (Gaussian means; Categorical logits, unavailable at float32 min) and h'."""
        req = self._check(agent_ids, obs, state, reset, avail)
        head, h_next = self._run(req.idx, *self._feeds(req))
        return torch.from_numpy(head), None if h_next is None else torch.from_numpy(h_next)

    def act(self, agent_ids, obs, state=None, reset=None, avail=None, *, deterministic: bool = True,
            generator: torch.Generator | None = None) -> ActResult:
        """As `Engine.act`: inputs checked by `lorasa_serve.protocol` (the same rules and errors)."""
        return self._act(self._check(agent_ids, obs, state, reset, avail), deterministic, generator)

    def act_checked(self, req: ActRequest, *, generator: torch.Generator | None = None) -> ActResult:
        """`act` on a request `protocol.check_act` already checked (no second check)."""
        return self._act(req, req.deterministic, generator)

    def _act(self, req: ActRequest, deterministic: bool, generator: torch.Generator | None) -> ActResult:
        slots = req.idx
        obs, h, reset, avail = self._feeds(req)
        head_n, h_next = self._run(slots, obs, h, reset, avail)
        head = torch.from_numpy(head_n)
        dims = dim_mask(self._act_dims, torch.from_numpy(slots), self.spec.act_max)  # [B, act_max]
        if self.spec.action == "gaussian":
            log_std = self._log_std if not self.spec.lora.log_std_offset else \
                self._log_std.index_select(0, torch.from_numpy(slots))  # [B, act_max]: each row's agent
            actions, logp = gaussian_act(head, log_std, dims, deterministic, generator)
        else:
            valid = dims & torch.from_numpy(avail)
            actions, logp = categorical_act(head, valid, deterministic, generator)
        return ActResult(actions, logp, None if h_next is None else torch.from_numpy(h_next))

    def _run(self, slots: np.ndarray, obs: np.ndarray, h: np.ndarray | None, reset: np.ndarray | None,
             avail: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked numpy inputs -> head [B, act_max] float32 (see `forward`), h' [B, H] or None."""
        spec = self.spec
        if self.multi_agent:
            feeds = {contract.AGENT_INDEX: slots, contract.OBS: obs}
            return self._call(self._graphs[contract.MULTI_AGENT], feeds, h, reset, avail)
        head = np.zeros((len(slots), spec.act_max), np.float32)
        h_next = None if h is None else np.empty_like(h)
        for s in np.unique(slots):  # one graph call per agent present, rows grouped
            rows = np.flatnonzero(slots == s)
            ag = spec.agents[s]
            sub = [None if x is None else x[rows] for x in (h, reset)]
            av = None if avail is None else avail[rows, :ag.act_dim]
            out, hn = self._call(self._graphs[ag.agent_id], {contract.OBS: obs[rows, :ag.obs_dim]},
                                 sub[0], sub[1], av)
            head[rows, :ag.act_dim] = out
            if hn is not None:
                h_next[rows] = hn
        return head, h_next

    def _call(self, sess, feeds: dict, h, reset, avail) -> tuple[np.ndarray, np.ndarray | None]:
        if self.spec.recurrent:
            feeds[contract.STATE], feeds[contract.RESET] = h, reset
        if self.spec.action == "categorical":
            feeds[contract.AVAIL] = avail
        if not self.spec.recurrent:
            return sess.run([self._head], feeds)[0], None
        head, h_next = sess.run([self._head, contract.STATE_OUT], feeds)
        return head, h_next

    # --- input checking: lorasa_serve.protocol, the same rules and errors as Engine ----------------
    def _check(self, agent_ids, obs, state, reset, avail) -> ActRequest:
        return protocol.check_act(self._table, *(_host(x) for x in (agent_ids, obs, state, reset, avail)))

    def _feeds(self, req: ActRequest):
        """A checked request -> the graphs' numpy inputs: obs [B, obs_max], h [B, H] | None,
        reset [B] | None, avail [B, act_max] bool | None (recurrent / Categorical policies only)."""
        spec, B = self.spec, req.n
        h = reset = avail = None
        if spec.recurrent:
            h = np.zeros((B, spec.hidden), np.float32) if req.state is None else np.ascontiguousarray(req.state)
            reset = np.zeros(B, bool) if req.reset is None else req.reset
        if spec.action == "categorical":
            avail = np.ones((B, spec.act_max), bool) if req.avail is None else req.avail
        return np.ascontiguousarray(req.obs), h, reset, avail


def _host(x):
    """A tensor argument as a numpy array (others pass as they are)."""
    if not isinstance(x, Tensor):
        return x
    x = x.detach()
    return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()


def _graph_bytes(d: Path, path: Path, manifest: dict) -> bytes:
    """The graph's bytes (a regular file, size bounded), checked against the sha256 the export
    recorded for it (DigestMismatchError; exports from before digests record none)."""
    data = read_file(path, MAX_GRAPH_BYTES)
    want = contract.recorded_digest(manifest, path.relative_to(d))
    if want is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise DigestMismatchError(path, f"sha256 {got[:12]} differs from the {want[:12]} recorded in "
                                            f"{MANIFEST}: the graph was modified or corrupted")
    return data


def _check_graph_spec(path: Path, sess, spec: PolicySpec) -> None:
    """The graph must have been exported from this policy's backbone."""
    meta = sess.get_modelmeta().custom_metadata_map.get(contract.META_SPEC)
    try:
        fp = json.loads(meta)["backbone_fingerprint"] if meta else None
    except (ValueError, KeyError, TypeError, RecursionError):
        fp = None
    if fp != spec.backbone_fingerprint:
        raise ArtifactError(path, f"graph was exported from backbone {str(fp)[:12]!r}, policy.json "
                                  f"names {spec.backbone_fingerprint[:12]!r}")
