"""Inputs already on the engine's device are checked there (lorasa_serve/device_inputs.py) with the
protocol's rules, and the act path reads nothing back to the host but that one check.

The device path runs on the CPU too when an engine is told to (`_check_on_device`, on by default on
an accelerator), so every rule is checked here against the protocol: the same inputs give the same
normalised arrays, the same results and the same errors. On CUDA (conftest.DEVICES) the same tests
run on the GPU, and torch's sync debug mode counts the real synchronisations.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_policy, on_device
from torch.overrides import TorchFunctionMode

from lorasa_serve import Engine, InputError, protocol
from lorasa_serve.device_inputs import check_on_device
from lorasa_serve.engine import _host

OBS, ACT, H = (7, 5), (4, 3), 16  # agent_1 sees 5 of 7 columns and has 3 of 4 actions
IDS = ["agent_0", "agent_1"]


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_inputs")
    make_policy(root / "cat", action="categorical", obs=OBS, act=ACT, hidden=H)
    make_policy(root / "gauss", action="gaussian", obs=OBS, act=ACT, hidden=H, recurrent=False,
                log_std_offset=True)
    make_policy(root / "onehot", obs=OBS, act=ACT, hidden=H, agent_onehot=2)
    return root


def engines(root, name: str, device: str = "cpu") -> tuple[Engine, Engine]:
    """(host-checking engine, device-checking engine) on `device` (on an accelerator both check on
    the device when inputs are there: the first is then told not to)."""
    host, dev = (Engine.from_dir(root / name, device=device, mode="lora") for _ in range(2))
    host._check_on_device, dev._check_on_device = False, True
    return host, dev


def _obs(B=2, dtype=torch.float32):
    x = torch.arange(B * 7, dtype=torch.float32).reshape(B, 7) / 10 - 1
    x[1::2, 5:] = 0  # agent_1's padding
    return x.to(dtype)


def _h(B=2):
    return torch.linspace(-1, 1, B * H).reshape(B, H)


# valid inputs in every form the device path takes: (name, policy, obs, state, reset, avail)
VALID = [
    ("float32", "cat", _obs(), _h(), None, None),
    ("float64", "cat", _obs(dtype=torch.float64), _h().double(), None, None),
    ("float16", "cat", _obs(dtype=torch.float16), _h().half(), None, None),
    ("bfloat16", "cat", _obs(dtype=torch.bfloat16), _h().bfloat16(), None, None),
    ("int obs", "cat", _obs().round().long(), None, None, None),
    ("bool obs", "cat", _obs() > 0, None, None, None),
    ("numpy obs, tensor state", "cat", _obs().numpy(), _h(), None, None),
    ("list obs, tensor reset", "cat", _obs().tolist(), None, torch.tensor([True, False]), None),
    ("reset 0/1 floats", "cat", _obs(), _h(), torch.tensor([1.0, 0.0]), None),
    ("reset ints", "cat", _obs(), _h(), torch.tensor([0, 1]), None),
    ("avail 0/1 floats", "cat", _obs(), _h(), None, torch.tensor([[0.0, 1, 1, 1], [1, 0, 0, 1]])),
    ("avail past act_dim ignored", "cat", _obs(), _h(), None, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])),
    ("requires grad", "cat", _obs().requires_grad_(True), _h().requires_grad_(True), None, None),
    ("gaussian", "gauss", _obs(), None, None, None),
    ("one-hot", "onehot", _obs(4), _h(4), torch.tensor([1, 0, 0, 1]), None),
]

# bad inputs: (name, policy, obs, state, reset, avail); each must fail with the protocol's own error
BAD = [
    ("obs narrower than a row's obs_dim", "cat", _obs()[:, :5], _h(), None, None),
    ("avail narrower than a row's act_dim", "cat", _obs(), _h(), None,
     torch.tensor([[True, False, True], [False, True, True]])),
    ("obs NaN", "cat", torch.full((2, 7), float("nan")), _h(), None, None),
    ("obs inf in one row", "cat", torch.cat([_obs()[:1], torch.full((1, 7), float("inf"))]), _h(), None, None),
    ("obs beyond float32", "cat", _obs(dtype=torch.float64) * 1e300, _h(), None, None),
    ("obs padding", "cat", torch.ones(2, 7), _h(), None, None),
    ("obs too wide", "cat", torch.zeros(2, 8), _h(), None, None),
    ("obs rows", "cat", torch.zeros(3, 7), _h(), None, None),
    ("obs 1-d", "cat", torch.zeros(7), _h(), None, None),
    ("obs complex", "cat", torch.zeros(2, 7, dtype=torch.complex64), _h(), None, None),
    ("obs strings, tensor state", "cat", [["a"] * 7] * 2, _h(), None, None),
    ("obs NaN in numpy, tensor state", "cat", np.full((2, 7), np.nan), _h(), None, None),
    ("state NaN", "cat", _obs(), torch.full((2, H), float("nan")), None, None),
    ("state shape", "cat", _obs(), torch.zeros(2, 3), None, None),
    ("state on a feed-forward policy", "gauss", _obs(), torch.zeros(2, H), None, None),
    ("reset 2", "cat", _obs(), _h(), torch.tensor([2, 0]), None),
    ("reset 0.5", "cat", _obs(), _h(), torch.tensor([0.5, 0.0]), None),
    ("reset NaN", "cat", _obs(), _h(), torch.tensor([float("nan"), 0.0]), None),
    ("reset shape", "cat", _obs(), _h(), torch.tensor([True]), None),
    ("avail empty row", "cat", _obs(), _h(), None, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])),
    ("avail only past act_dim", "cat", _obs(), _h(), None, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1]])),
    ("avail 3", "cat", _obs(), _h(), None, torch.full((2, 4), 3)),
    ("avail too wide", "cat", _obs(), _h(), None, torch.ones(2, 5)),
    ("avail on gaussian", "gauss", _obs(), None, None, torch.ones(2, 4)),
    ("agent unknown", "cat", _obs(), _h(), None, None),
]


@pytest.mark.parametrize("name,policy,obs,state,reset,avail", VALID, ids=[c[0] for c in VALID])
def test_device_checks_accept_what_the_protocol_accepts_alike(policies, device, name, policy, obs, state,
                                                              reset, avail):
    host, dev = engines(policies, policy, device)
    ids = (IDS * 2)[:len(obs)]
    x = on_device(device, obs, state, reset, avail)
    got = check_on_device(dev._device_rules(dev._bank), ids, *x, lambda idx: dev._rows(dev._bank, idx))
    assert got is not None, "the device path refused valid input"
    want = protocol.check_act(host._table(host._bank), ids, *(_host(v) for v in (obs, state, reset, avail)))
    for field in ("obs", "state", "reset", "avail"):
        g, w = getattr(got, field), getattr(want, field)
        assert (g is None) == (w is None), field
        if w is not None:
            assert g.device == dev._bank.obs_dims.device and torch.equal(g.cpu(), torch.from_numpy(w)), field
    a, b = host.act(ids, *x), dev.act(ids, *x)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.log_probs, b.log_probs)
    assert (a.state is None) == (b.state is None) and (a.state is None or torch.equal(a.state, b.state))


@pytest.mark.parametrize("name,policy,obs,state,reset,avail", BAD, ids=[c[0] for c in BAD])
def test_device_checks_refuse_with_the_protocols_error(policies, device, name, policy, obs, state, reset,
                                                       avail):
    host, dev = engines(policies, policy, device)
    ids = ["agent_0", "nobody"] if name == "agent unknown" else (IDS * 2)[:max(2, len(obs))]
    x = on_device(device, obs, state, reset, avail)
    errors = []
    for eng in (host, dev):
        with pytest.raises(InputError) as info:
            eng.act(ids, *x)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


# --- what the act path reads back ------------------------------------------------------------------
READS = {"item", "__bool__", "tolist", "numpy", "cpu", "__int__", "__float__", "__index__", "nonzero",
         "__array__", "allclose", "equal"}


class HostReads(TorchFunctionMode):
    """Records every call that reads tensor values back to the host (on a GPU, a synchronisation)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name == "to" and args[0].device.type != "cpu" and any(
            str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if name in READS or to_host:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _reads_and_syncs(device: str, call) -> tuple[list[str], int]:
    """call() after warm-up (layouts planned, graphs traced) -> (host reads it made, CUDA synchronisations
    torch's sync debug mode saw: 0 on the CPU)."""
    for _ in range(4):
        call()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if device != "cpu":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostReads() as mode:
                call()
        finally:
            if device != "cpu":
                torch.cuda.set_sync_debug_mode(0)
    return mode.calls, sum("synchroniz" in str(w.message) for w in seen)


@pytest.mark.parametrize("policy", ["cat", "gauss", "onehot"])
def test_act_reads_back_once_for_device_inputs_and_never_for_host_data(policies, device, policy):
    _, eng = engines(policies, policy, device)
    spec = eng.spec
    B = 6
    ids = [spec.agent_ids[i % 2] for i in range(B)]
    obs = torch.zeros(B, spec.obs_max)
    state = torch.zeros(B, H) if spec.recurrent else None
    reset = torch.tensor([True, False] * 3) if spec.recurrent else None
    avail = torch.ones(B, spec.act_max, dtype=torch.bool) if spec.action == "categorical" else None
    gen = torch.Generator().manual_seed(0)
    x = on_device(device, obs, state, reset, avail)
    host = [None if v is None else v.numpy() for v in (obs, state, reset, avail)]
    req = protocol.check_act(eng._table(eng._bank), ids, *host, deterministic=False)

    reads, syncs = _reads_and_syncs(device, lambda: eng.act(ids, *x, deterministic=False, generator=gen))
    one = int(device != "cpu")  # on a GPU the one read is the one synchronisation
    assert reads == ["__bool__"] and syncs == one  # the one deliberate read: did the checks pass?
    for call in (lambda: eng.act(ids, *host, deterministic=False, generator=gen),  # checked on the host
                 lambda: eng.act_checked(req, generator=gen)):  # the service's path
        assert _reads_and_syncs(device, call) == ([], 0)
    if spec.recurrent:  # sessions keep the state on the device
        sid = iter(range(100))
        reads, syncs = _reads_and_syncs(device, lambda: eng.act_session(
            f"s{next(sid)}", spec.agent_ids, torch.zeros(2, spec.obs_max, device=device)))
        assert reads == ["__bool__"] and syncs == one
