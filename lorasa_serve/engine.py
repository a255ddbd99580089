"""Engine: load a policy directory once, act on mixed batches of rows from many agents.

    eng = Engine.from_dir("policies/halfcheetah_2x3")
    out = eng.act(["agent_0", "agent_1"], obs, state, reset)   # out.actions, out.log_probs, out.state

Its caches (row layouts, per-layout parameters, traced graphs, merged agents, sessions) belong to it
and its banks, bounded by `limits` (`lorasa_serve.caches.CacheLimits`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from . import artifacts, peft_format
from . import protocol
from .protocol import ActRequest, ActResult
from .adapter_layout import adapter_shapes
from .bank import AdapterBank
from .caches import CacheLimits
from .device_inputs import DeviceRules, Inputs, check_on_device
from .distributions import categorical_act, gaussian_act
from .errors import DeviceUnavailableError, InputError, NonFiniteError, UnknownAgentError
from .layout import Layout, Planner
from .merge_policy import MergedSet, auto_mode
from . import traced
from .network import ActorParams, actor_forward, slice_chunks
from .sessions import SessionStore
from .spec import AgentSpec, PolicySpec, check_agent_id

Mode = Literal["auto", "lora", "merged"]
MODES = ("auto", "lora", "merged")
BLOCK_ROWS = 8192  # rows per forward block: larger batches run block by block (faster: cache-sized)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA when available, else CPU), or a torch device that exists here: DeviceUnavailableError
    (one line) for an unknown name or a CUDA device this torch build or machine does not have."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceUnavailableError(f"unknown device {device!r} ({e}): pass 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            why = "this torch is a CPU build" if torch.version.cuda is None else f"{n} CUDA device(s) visible"
            raise DeviceUnavailableError(f"device {str(device)!r} is not available ({why}): pass device='cpu' "
                                         "or 'auto'")
    return dev


class Engine:
    def __init__(self, spec: PolicySpec, backbone: dict[str, Tensor],
                 adapters: dict[str, dict[str, Tensor]] | None = None, *,
                 device: str | torch.device = "auto", mode: Mode = "auto",
                 limits: CacheLimits = CacheLimits()):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.device = resolve_device(device)
        self.mode = mode
        self.limits = limits
        self._write_lock = threading.Lock()
        self._merges = MergedSet(limits.auto_merged_bytes)  # pinned and auto-merged agents (write lock)
        self._planner = Planner(limits.plans)  # row layouts by agent order
        self._bank = AdapterBank.build(spec, backbone, adapters or {}, self.device, limits)
        self._sessions: SessionStore | None = None  # built by the first session call (see `sessions`)
        self._agents: protocol.AgentTable | None = None  # the validator's view of the bank (see _table)
        self._rules: DeviceRules | None = None  # the same as masks on the device (see _device_rules)
        # inputs already on an accelerator are checked there (device_inputs.py); on the CPU every
        # input is host data, checked by the protocol as it is
        self._check_on_device = self.device.type != "cpu"

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "auto", mode: Mode = "auto",
                 limits: CacheLimits = CacheLimits()) -> "Engine":
        spec, backbone, adapters = artifacts.load_policy(path)
        return cls(spec, backbone, adapters, device=device, mode=mode, limits=limits)

    # --- introspection ------------------------------------------------------------------------
    @property
    def spec(self) -> PolicySpec:
        return self._bank.spec

    @property
    def agent_ids(self) -> list[str]:
        return self._bank.spec.agent_ids

    def versions(self) -> dict[str, int]:
        bank = self._bank
        return {a: bank.versions[s] for a, s in bank.slot_of.items()}

    @property
    def pinned_agents(self) -> list[str]:
        """Agents merged by `merge()` (kept until `unmerge()`); `merged_agents` adds those the auto mode
        merged on demand (a bounded cache)."""
        with self._write_lock:
            pinned = set(self._merges.pinned)
        bank = self._bank
        return [a for a, s in bank.slot_of.items() if s in pinned]

    @property
    def merged_agents(self) -> list[str]:
        bank = self._bank
        return [a for a, s in bank.slot_of.items() if s in bank.merged]

    def agent_index(self, agent_ids: Sequence[str]) -> np.ndarray:
        """Agent ids -> integer indices accepted by `act` in place of ids (skips the lookup)."""
        if isinstance(agent_ids, np.ndarray) and agent_ids.dtype.kind in "iu":
            raise InputError("agent_index takes agent id strings, not indices")
        return protocol.agent_indices(self._table(self._bank), _host(agent_ids))

    def adapter(self, agent_id: str) -> dict[str, Tensor] | None:
        """The agent's current adapter tensors (PEFT layout, on the engine's device)."""
        bank = self._bank
        return bank.adapters[protocol.agent_index(self._table(bank), agent_id)]

    def merged_weights(self, agent_id: str) -> dict[str, Tensor]:
        """Every Linear of the agent with its adapter merged: name -> W0 + (alpha/r) B A [out, in]."""
        bank = self._bank
        merged = bank.merged_weights(protocol.agent_index(self._table(bank), agent_id))
        return {n: merged.get(n, bank.backbone[f"{n}.weight"]) for n in bank.spec.linear_names()}

    def backbone(self) -> dict[str, Tensor]:
        return dict(self._bank.backbone)

    def log_std(self, agent_id: str) -> Tensor:
        """The agent's Gaussian log-std [act_max]: backbone `log_std` plus its adapter's
        `log_std_offset` (when the policy's adapters carry one)."""
        bank = self._bank
        slot = protocol.agent_index(self._table(bank), agent_id)
        return bank.log_std[slot].clone() if bank.log_std is not None else bank.backbone["log_std"]

    # --- acting -------------------------------------------------------------------------------
    def act(self, agent_ids: Sequence[str] | np.ndarray | Tensor, obs, state=None, reset=None,
            avail=None, *, deterministic: bool = True, generator: torch.Generator | None = None,
            mode: Mode | None = None) -> ActResult:
        """One forward over a mixed batch, inputs checked by `lorasa_serve.protocol` (its rules).

        agent_ids [B] (ids, or indices from `agent_index`); obs [B, W], W from the rows' widest
        obs_dim to obs_max (each row the agent's observation zero-padded; non-zero values past its
        obs_dim are an error); state [B, hidden] or None (zeros); reset [B] bool (True zeroes the
        state: episode start); avail [B, W'], W' from the rows' widest act_dim to act_max:
        available-action mask (Categorical only). Returns actions, log-probs and the next state.
        Sampling draws from `generator` (seedable) when not deterministic.

        On a GPU: host data (numpy, lists, CPU tensors) is checked on the host and copied without
        waiting for the GPU; tensors already on the engine's device are checked there and read back
        once (device_inputs.py); agent ids are host data. The results stay on the device: the call
        never waits for the forward (the caller's first read of a result does).
        """
        # one bank snapshot for the whole call: hot-swaps never show half an adapter
        bank = self._bank
        x = self._check(bank, agent_ids, obs, state, reset, avail)
        return self._act(bank, x, deterministic, generator, mode)[0]

    def act_checked(self, req: ActRequest, *, generator: torch.Generator | None = None) -> ActResult:
        """`act` on a request `protocol.check_act` already checked (the service's batches): no second
        check. `req.deterministic` chooses argmax or sampling."""
        return self._act(self._bank, Inputs.upload(req, self.device), req.deterministic, generator, None)[0]

    def _table(self, bank: AdapterBank) -> protocol.AgentTable:
        """The validator's view of the bank's agents (rebuilt when an agent is added)."""
        table = self._agents
        if table is None or table.spec is not bank.spec:
            table = self._agents = protocol.AgentTable(bank.spec)
        return table

    def _device_rules(self, bank: AdapterBank) -> DeviceRules:
        """The validator's per-agent sizes as masks on the engine's device (rebuilt with the table)."""
        table, rules = self._table(bank), self._rules
        if rules is None or rules.table is not table:
            rules = self._rules = DeviceRules(table, self.device)
        return rules

    def _check(self, bank: AdapterBank, agent_ids, obs, state, reset, avail) -> Inputs:
        """The protocol's checks -> the inputs on the engine's device. Host data is checked on the host
        and copied over; when an input already is a tensor on the engine's accelerator, values are
        checked there and read back once (device_inputs.py). Agent ids are host data: a tensor of
        indices on an accelerator takes the host path."""
        if self._check_on_device and not _on_accelerator(agent_ids) and any(
                isinstance(t, Tensor) and t.device.type == self.device.type for t in (obs, state, reset, avail)):
            x = check_on_device(self._device_rules(bank), _host(agent_ids), obs, state, reset, avail,
                                lambda idx: self._rows(bank, idx))
            if x is not None:
                return x
        # host data; or the device checks failed: the protocol gives the canonical error (reading
        # device tensors back: a synchronisation per tensor, on the error path only)
        req = protocol.check_act(self._table(bank), _host(agent_ids), _host(obs), _host(state),
                                 _host(reset), _host(avail))
        return Inputs.upload(req, self.device, obs)

    def _rows(self, bank: AdapterBank, slots: np.ndarray) -> Tensor:
        """slots [B] -> the same as int64 on the engine's device: on an accelerator the row layout's
        copy, made once per plan (an environment loop repeats its agent order: never copied again);
        on the CPU a view."""
        if self.device.type == "cpu":
            return torch.as_tensor(slots)
        return self._planner.plan(slots).on_device("rows", bank.act_dims.device)

    @torch.inference_mode()
    def _act(self, bank: AdapterBank, x: Inputs, deterministic: bool, generator: torch.Generator | None,
             mode: Mode | None, h: Tensor | None = None) -> tuple[ActResult, AdapterBank]:
        """Checked inputs -> result, the bank used. h: a state to use instead of x.state (a session's).
        Queues device work only: nothing here reads a device tensor back (but a traced graph's check
        against the eager result, once per key: traced.py)."""
        spec = bank.spec
        rows = self._rows(bank, x.idx) if bank.needs_rows else None  # [B] each row's slot
        obs_t, h, reset_t = self._inputs(bank, x, h, rows)
        head, h_next, bank = self._forward(bank, x.idx, obs_t, h, reset_t, mode or self.mode)
        dim_mask = bank.dim_mask(rows)  # [B, act_max] or [act_max] (all agents: every action)
        if spec.action == "gaussian":
            actions, logp = gaussian_act(head, bank.log_std_rows(rows), dim_mask, deterministic, generator)
        else:
            valid = dim_mask if x.avail is None else dim_mask & x.avail
            actions, logp = categorical_act(head, valid, deterministic, generator)
        return ActResult(actions, logp, h_next), bank

    def _inputs(self, bank: AdapterBank, x: Inputs, h: Tensor | None, rows: Tensor | None):
        """obs [B, input_width] (the agent one-hot appended when the policy has one), state [B, H] | None,
        reset [B] | None, on the engine's device."""
        spec, obs_t = bank.spec, x.obs
        if h is None and spec.recurrent:
            h = x.state if x.state is not None else torch.zeros(x.n, spec.hidden, device=self.device)
        if bank.onehot is not None:  # [B, obs_max] -> [B, obs_max + agent_onehot]: the agent's one-hot
            obs_t = torch.cat([obs_t, bank.onehot.index_select(0, rows)], 1)
        return obs_t, h, x.reset

    @torch.inference_mode()
    def forward(self, agent_ids, obs, state=None, reset=None, mode: Mode | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Raw head output [B, act_max] (Gaussian means or logits before masking) and next state."""
        bank = self._bank
        x = self._check(bank, agent_ids, obs, state, reset, None)
        rows = self._rows(bank, x.idx) if bank.onehot is not None else None
        obs_t, h, reset_t = self._inputs(bank, x, None, rows)
        head, h_next, _ = self._forward(bank, x.idx, obs_t, h, reset_t, mode or self.mode)
        return head, h_next

    def _forward(self, bank: AdapterBank, slots: np.ndarray, obs: Tensor, h: Tensor | None,
                 reset: Tensor | None, mode: str) -> tuple[Tensor, Tensor | None, AdapterBank]:
        """obs [B, input_width], h [B, H] -> head [B, act_max], h' [B, H] (caller order), bank used."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        B = len(slots)
        if not bank.has_adapters and not bank.merged:  # a plain policy: backbone forward, row blocks
            p = bank.backbone_params()
            if B <= traced.TRACE_MAX_ROWS:
                out, h_next = self._run(bank, p, ("backbone", B), obs.unsqueeze(0), _opt(h, 0),
                                        _opt(reset, 0))
                return out.squeeze(0), (None if h_next is None else h_next.squeeze(0)), bank
            blocks = [actor_forward(bank.spec, p, obs[i:i + BLOCK_ROWS].unsqueeze(0),
                                    _opt(_opt_cut(h, i, BLOCK_ROWS), 0),
                                    _opt(_opt_cut(reset, i, BLOCK_ROWS), 0))
                      for i in range(0, B, BLOCK_ROWS)]
            out, h_next = _cat_blocks(blocks, dim=1)
            return out.squeeze(0), (None if h_next is None else h_next.squeeze(0)), bank
        lay = self._planner.plan(slots)  # one agent per chunk
        if mode == "auto":
            mode = auto_mode(bank, lay, B, self.device)
        if mode == "merged":
            bank = self._ensure_merged(bank, lay)
        else:
            lay = self._planner.plan(slots, mixed=True)  # chunks may hold several agents (if cheaper)
        p = bank.params(mode, lay)
        pos, src = lay.index_tensors(obs.device)
        k = max(1, BLOCK_ROWS // lay.M)  # chunks per block: big batches run in cache-sized blocks
        if lay.C * lay.M <= traced.TRACE_MAX_ROWS:
            out, h_next = self._run(bank, p, (mode, lay.key), *_gather(lay, src, 0, lay.C, obs, h, reset))
        else:  # each block gathers its own rows: the padded copy of the batch is never built whole
            blocks = [actor_forward(bank.spec, p if lay.C <= k else slice_chunks(p, slice(c, c + k)),
                                    *_gather(lay, src, c, k, obs, h, reset))
                      for c in range(0, lay.C, k)]
            out, h_next = _cat_blocks(blocks, dim=0)
        return (_from_chunks(lay, out, pos),
                None if h_next is None else _from_chunks(lay, h_next, pos), bank)

    @staticmethod
    def _run(bank: AdapterBank, p: ActorParams, key: tuple, x: Tensor, h: Tensor | None,
             reset: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """actor_forward on one small block [C, M, D], traced (lazily, see traced.py) unless the
        limits turn tracing off."""
        def forward(x: Tensor, h: Tensor | None, reset: Tensor | None):
            return actor_forward(bank.spec, p, x, h, reset)
        return bank.cache.traced.run((*key, tuple(x.shape), h is None, reset is None), forward,
                               (x, h, reset))

    # --- sessions -----------------------------------------------------------------------------
    @property
    def sessions(self) -> SessionStore:
        """The recurrent state `act_session` keeps per (session, agent), built on first use: the HTTP
        service keeps its sessions in its own state backend and never builds this one."""
        if self._sessions is None:
            with self._write_lock:
                if self._sessions is None:
                    lim = self.limits
                    self._sessions = SessionStore(self.spec.hidden, lim.sessions, self.device, lim.session_bytes,
                                                  lim.session_ttl_s)
        return self._sessions

    def act_session(self, session_id: str, agent_ids: Sequence[str], obs, avail=None, *,
                    deterministic: bool = True, generator: torch.Generator | None = None,
                    reset=None) -> ActResult:
        """`act` with the recurrent state kept by the engine per (session, agent)."""
        ids = protocol.distinct_agents(agent_ids)
        bank = self._bank
        x = self._check(bank, ids, obs, None, reset, avail)  # fails before any state is touched
        state = self.sessions.get(session_id, ids)[0] if self.spec.recurrent else None
        out, bank = self._act(bank, x, deterministic, generator, None, state)
        if out.state is not None:
            self.sessions.put(session_id, ids, out.state)
        out.versions = [bank.versions[s] for s in x.idx.tolist()]  # host data
        return out

    def reset_session(self, session_id: str) -> bool:
        return self.sessions.reset(session_id)

    # --- adapters: hot swap, new agents, merge --------------------------------------------------
    def set_adapter(self, agent_id: str, tensors: dict[str, Tensor] | None,
                    agent: AgentSpec | None = None) -> int:
        """Validate, then atomically publish `agent_id`'s adapter; returns its new version.

        A new `agent_id` needs `agent` (its obs/act sizes), which must fit the backbone.
        `tensors=None` serves the agent from the backbone alone.
        """
        check_agent_id(agent_id)
        spec = self.spec
        if tensors is not None:
            tensors = artifacts._check_tensors(tensors, adapter_shapes(spec), f"adapter {agent_id!r}")
        with self._write_lock:
            bank = self._bank
            if agent_id not in bank.slot_of:
                if agent is None or agent.agent_id != agent_id:
                    raise UnknownAgentError(f"unknown agent id {agent_id!r}: pass its AgentSpec to add it")
                if not spec.fits(agent):
                    raise InputError(f"agent {agent_id!r} (obs {agent.obs_dim}, act {agent.act_dim}) "
                                     f"does not fit the backbone (obs {spec.obs_max}, act {spec.act_max})")
            new = bank.with_adapter(agent_id, tensors, None if agent_id in bank.slot_of else agent)
            if tensors is not None:
                self._probe(new, agent_id)
            self._bank = new
            return self._bank.versions[self._bank.slot_of[agent_id]]

    def check_adapter(self, agent_id: str, tensors: dict[str, Tensor]) -> None:
        """The probe `set_adapter` runs, without publishing anything (an upload is checked with it
        before it is stored): NonFiniteError if the agent's outputs on the probe batch are NaN/inf."""
        self._probe(self._bank.with_adapter(agent_id, tensors), agent_id)

    def _probe(self, bank: AdapterBank, agent_id: str) -> None:
        """Finite weights can still give non-finite outputs (3e38 in lora_A overflows B @ A): run the
        agent on a fixed probe batch (zero and standard-normal observations, zero and random states)
        and refuse the adapter unless every action, log-prob and next state is finite."""
        spec, g = bank.spec, torch.Generator().manual_seed(0)
        slot = bank.slot_of[agent_id]
        obs = torch.cat([torch.zeros(2, spec.obs_max), torch.randn(6, spec.obs_max, generator=g)])
        obs[:, spec.agents[slot].obs_dim:] = 0.0  # the agent's own observation, zero-padded
        state = torch.cat([torch.zeros(4, spec.hidden), torch.rand(4, spec.hidden, generator=g) * 2 - 1]) \
            if spec.recurrent else None
        req = protocol.check_act(protocol.AgentTable(spec), np.full(8, slot), obs.numpy(),
                                 None if state is None else state.numpy())
        out = self._act(bank, Inputs.upload(req, self.device), True, None, "lora")[0]
        parts = [out.actions.float(), out.log_probs] + ([out.state] if out.state is not None else [])
        if not bool(torch.stack([torch.isfinite(p).all() for p in parts]).all()):  # one read (a write, not act)
            raise NonFiniteError(f"adapter {agent_id!r}", "the policy's outputs on a probe batch are NaN or inf "
                                 "with this adapter (weights too large?); refused")

    def load_adapter(self, source: str | Path | bytes, agent_id: str | None = None,
                     agent: AgentSpec | None = None, *, peft_config: bytes | str | dict | None = None) -> int:
        """Hot-swap from our safetensors file or bytes, or a PEFT adapter: its directory
        (adapter_config.json + adapter_model.safetensors), its safetensors file (the config read from
        beside it) or bytes with `peft_config` (see `peft_format`). Full validation: version, rank/alpha,
        backbone fingerprint, keys, shapes, finite values. Returns the new version."""
        spec = self.spec
        if isinstance(source, (bytes, bytearray)):
            agent_id, tensors = peft_format.parse_any(bytes(source), spec, "uploaded adapter", agent_id,
                                                      peft_config)
        else:
            agent_id, tensors = peft_format.load_any(source, spec, agent_id)
        return self.set_adapter(agent_id, tensors, agent)

    def merge(self, agent_ids: Sequence[str] | None = None) -> None:
        """Cache merged weights W0 + (alpha/r) B A for these agents (all if None). Reversible:
        the backbone is never modified, `unmerge` drops the cache."""
        self._set_merged(agent_ids, True)

    def unmerge(self, agent_ids: Sequence[str] | None = None) -> None:
        self._set_merged(agent_ids, False)

    def _set_merged(self, agent_ids, merge: bool) -> None:
        with self._write_lock:
            bank = self._bank
            ids = bank.spec.agent_ids if agent_ids is None else list(agent_ids)
            slots = [protocol.agent_index(self._table(bank), a) for a in ids]
            self._merges.pin(slots, merge)
            self._bank = bank.with_merged(slots, merge)

    def _ensure_merged(self, bank: AdapterBank, lay: Layout) -> AdapterBank:
        """A bank in which every chunk's agent is merged; published if nothing changed meanwhile.
        Agents merged here (not pinned by `merge()`) live in the bounded LRU of `MergedSet`."""
        need = lay.slot_set
        if lay.key is not self._merges.last_key:
            with self._write_lock:
                self._merges.touch(lay)
        missing = sorted(need - bank.merged.keys())
        if not missing:
            return bank
        with self._write_lock:
            if self._bank is not bank:  # a writer got in first: merge for this forward only
                return bank.with_merged(missing, True)
            self._merges.admit(missing, bank.merged_bytes_per_agent)
            merged = bank.with_merged(missing, True)
            evict = self._merges.evictions(bank, need)
            self._bank = merged.with_merged(evict, False) if evict else merged
            return self._bank

    def save(self, directory: str | Path) -> PolicySpec:
        """Write the current policy (backbone + current adapters) as a policy directory."""
        bank = self._bank
        adapters = {a: bank.adapters[s] for a, s in bank.slot_of.items() if bank.adapters[s] is not None}
        return artifacts.save_policy(directory, bank.spec, {k: v.cpu() for k, v in bank.backbone.items()},
                                     {a: {k: v.cpu() for k, v in t.items()} for a, t in adapters.items()})


# --- chunk layout <-> caller order ----------------------------------------------------------------
def _gather(lay: Layout, src: Tensor | None, c: int, k: int, *xs: Tensor | None
            ) -> list[Tensor | None]:
    """Chunks c .. c+k of each caller-order input [B, ...] as [k', M, ...] (None stays None).
    `src` [C*M]: the caller row of each padded position (None: rows are already in place)."""
    n = min(k, lay.C - c)
    if src is None and n == lay.C:  # the whole batch, rows in place (a team step): views only
        return [None if x is None else x.reshape(n, lay.M, *x.shape[1:]) for x in xs]
    rows = slice(c * lay.M, (c + n) * lay.M)
    idx = None if src is None else src[rows]

    def cut(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        blk = x[rows] if idx is None else x.index_select(0, idx)  # [n*M, ...]
        return blk.reshape(n, lay.M, *x.shape[1:])
    return [cut(x) for x in xs]


def _from_chunks(lay: Layout, y: Tensor, pos: Tensor | None) -> Tensor:
    flat = y.reshape(lay.C * lay.M, *y.shape[2:])
    return flat if pos is None else flat.index_select(0, pos)


def _opt_cut(x: Tensor | None, start: int, n: int) -> Tensor | None:
    """x[start:start + n] along dim 0, or None."""
    return None if x is None else x[start:start + n]


def _cat_blocks(blocks: list, dim: int) -> tuple[Tensor, Tensor | None]:
    if len(blocks) == 1:
        return blocks[0]
    outs, states = zip(*blocks)
    return torch.cat(outs, dim), (None if states[0] is None else torch.cat(states, dim))


def _opt(x: Tensor | None, dim: int) -> Tensor | None:
    return None if x is None else x.unsqueeze(dim)


def _on_accelerator(x) -> bool:
    return isinstance(x, Tensor) and x.device.type != "cpu"


def _host(x):
    """A tensor argument as a numpy array for the protocol's checks (others pass as they are). A tensor
    on an accelerator is read back (a synchronisation): only host data, an accelerator's agent ids and
    the error path come here (see `Engine._check`)."""
    if not isinstance(x, Tensor):
        return x
    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.cpu().numpy() if x.device.type != "cpu" else x.numpy()
