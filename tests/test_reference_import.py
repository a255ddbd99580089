"""lorasa-import-reference against the paper's code's actor layout (LoRA_R_Actor of ZBN111/ICML2025_LoRASA,
read from its lora_v3 modules): a state dict with its module names, full-rank and low-rank MA_Linear
deltas, per-agent log-std offsets and a one-hot input, saved with torch.save; the oracle is that actor's
forward written here from the state dict's own tensors (x W^T + b with W = W0 + delta_i, in float64)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from lorasa_serve import Engine
from training.reference_import import main as import_main

H, R, ALPHA = 16, 4, 8.0
AGENTS = [("agent_0", 10, 3), ("agent_1", 7, 2)]  # heterogeneous: obs padded to 10, actions to 3
OBS_MAX, ACT_MAX, N = 10, 3, 2


def ma_linear(sd, name, i, o, g, lora=True, full=False):
    """An MA_Linear's tensors: weight [o, i], bias, per agent lora_A/B (or full-rank lora_A [o, i])."""
    sd[f"{name}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
    sd[f"{name}.bias"] = torch.randn(o, generator=g) * 0.1
    for a in range(N):
        if lora and full:
            sd[f"{name}.lora_A_lst.{a}"] = torch.randn(o, i, generator=g) * 0.05
        elif lora:
            sd[f"{name}.lora_A_lst.{a}"] = torch.randn(R, i, generator=g) * 0.2
            sd[f"{name}.lora_B_lst.{a}"] = torch.randn(o, R, generator=g) * 0.2
        if lora:
            sd[f"{name}.lora_bias_lst.{a}"] = torch.zeros(o)


def layer_norm(sd, name, n, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)


def reference_state_dict(seed=0, onehot=True):
    g = torch.Generator().manual_seed(seed)
    sd, width = {}, OBS_MAX + (N if onehot else 0)
    layer_norm(sd, "base.feature_norm", width, g)
    ma_linear(sd, "base.mlp.fc1.0", width, H, g)
    layer_norm(sd, "base.mlp.fc1.2", H, g)
    for j in range(2):
        ma_linear(sd, f"base.mlp.fc2.{j}.0", H, H, g, lora=j == 0)  # fc2.1 without LoRA (lora_config 0)
        layer_norm(sd, f"base.mlp.fc2.{j}.2", H, g)
    ma_linear(sd, "rnn.rnn.x_layer", H, 3 * H, g)
    ma_linear(sd, "rnn.rnn.h_layer", H, 3 * H, g)
    layer_norm(sd, "rnn.norm", H, g)
    ma_linear(sd, "rnn.fc.0.0", H, H, g)
    layer_norm(sd, "rnn.fc.0.2", H, g)
    ma_linear(sd, "act.action_out.fc_mean", H, ACT_MAX, g, full=ACT_MAX <= R)  # r >= min(shape): full rank
    sd["act.action_out.logstd._bias"] = torch.full((ACT_MAX, 1), -0.5)
    sd["act.action_out.logstd._lora_bias.weight"] = sd["act.action_out.logstd._bias"]  # tied, as there
    sd["act.action_out.logstd._lora_bias.bias"] = torch.zeros(ACT_MAX)
    for a in range(N):
        sd[f"act.action_out.logstd._lora_bias.lora_A_lst.{a}"] = torch.randn(ACT_MAX, 1, generator=g) * 0.3
        sd[f"act.action_out.logstd._lora_bias.lora_bias_lst.{a}"] = torch.zeros(ACT_MAX)
    return sd


def ref_forward(sd, a, obs, h):
    """LoRA_R_Actor.forward for agent a, one row (float64), from the state dict's tensors."""
    d = {k: v.double() for k, v in sd.items()}

    def lin(name, x):
        w = d[f"{name}.weight"]
        if f"{name}.lora_B_lst.{a}" in d:
            w = w + d[f"{name}.lora_B_lst.{a}"] @ d[f"{name}.lora_A_lst.{a}"] * (ALPHA / R)
        elif f"{name}.lora_A_lst.{a}" in d:
            w = w + d[f"{name}.lora_A_lst.{a}"]  # full rank: scaling lora_alpha / r = 1
        return x @ w.T + d[f"{name}.bias"]

    def ln(name, x):
        return F.layer_norm(x, x.shape, d[f"{name}.weight"], d[f"{name}.bias"], 1e-5)
    x = ln("base.feature_norm", obs)
    x = ln("base.mlp.fc1.2", torch.relu(lin("base.mlp.fc1.0", x)))
    for j in range(2):
        x = ln(f"base.mlp.fc2.{j}.2", torch.relu(lin(f"base.mlp.fc2.{j}.0", x)))
    rx, zx, nx = lin("rnn.rnn.x_layer", x).chunk(3)
    rh, zh, nh = lin("rnn.rnn.h_layer", h).chunk(3)
    r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
    h2 = (1 - z) * torch.tanh(nx + r * nh) + z * h
    x = ln("rnn.fc.0.2", torch.relu(lin("rnn.fc.0.0", ln("rnn.norm", h2))))
    log_std = d["act.action_out.logstd._bias"].reshape(-1) + d[f"act.action_out.logstd._lora_bias.lora_A_lst.{a}"].reshape(-1)
    return lin("act.action_out.fc_mean", x), h2, log_std


def agents_flag():
    return ",".join(f"{a}:{o}:{k}" for a, o, k in AGENTS)


@pytest.mark.parametrize("rank", [None, 6])  # the checkpoint's r, or a higher one (zero-padded factors)
def test_imported_policy_equals_the_reference_forward(tmp_path, rank):
    sd = reference_state_dict()
    torch.save(sd, tmp_path / "actor.pt")
    assert import_main([str(tmp_path / "actor.pt"), "--agents", agents_flag(), "--lora-alpha", str(ALPHA),
                        "--out", str(tmp_path / "p")] + ([] if rank is None else ["--rank", str(rank)])) == 0
    eng = Engine.from_dir(tmp_path / "p", device="cpu")
    assert eng.spec.agent_onehot == N and eng.spec.lora.log_std_offset and eng.spec.lora.rank == (rank or R)
    assert "mlp.2" not in eng.spec.adapted_layers and "head" in eng.spec.adapted_layers
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = ["agent_0", "agent_1", "agent_1"]
        obs = torch.randn(3, OBS_MAX, generator=g)
        obs[1:, 7:] = 0  # agent_1 sees 7 columns
        h = torch.randn(3, H, generator=g) * 0.5
        head, h_next = eng.forward(ids, obs, h)
        for row, a in enumerate(ids):
            i = int(a[-1])
            x = torch.cat([obs[row].double(), F.one_hot(torch.tensor(i), N).double()])  # the reference's PS+ID
            mean, h2, log_std = ref_forward(sd, i, x, h[row].double())
            k = AGENTS[i][2]
            torch.testing.assert_close(head[row, :k].double(), mean[:k], atol=1e-5, rtol=0)
            torch.testing.assert_close(h_next[row].double(), h2, atol=1e-5, rtol=0)
            torch.testing.assert_close(eng.log_std(a)[:k].double(), log_std[:k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case, needle", [
    ("bias", "per-agent bias (lora_bias_lst): our adapters have none; train with the reference's "
             "--train_lora_bias 0"), ("sigmoid", "sigmoid-std"), ("unknown", "no place"), ("pickle", "tensors-only"),
    ("sizes", "one-hot"), ("rank", "--rank 4 or more")])
def test_unrepresentable_checkpoints_are_one_line_refusals(tmp_path, capsys, case, needle):
    sd = reference_state_dict()
    argv_extra = []
    if case == "bias":
        sd["rnn.fc.0.0.lora_bias_lst.1"] = torch.ones(H)
    elif case == "sigmoid":
        sd["act.action_out.log_std"] = sd.pop("act.action_out.fc_mean.weight")[:, 0]
    elif case == "unknown":
        sd["transformer.block.0.weight"] = torch.zeros(2)
    elif case == "sizes":
        argv_extra = []
    elif case == "rank":
        argv_extra = ["--rank", "2"]
    path = tmp_path / "actor.pt"
    if case == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"weights": sd, "fn": print}, f)
    else:
        torch.save(sd, path)
    agents = "agent_0:9:3,agent_1:7:2" if case == "sizes" else agents_flag()
    status = import_main([str(path), "--agents", agents, "--out", str(tmp_path / "p"), *argv_extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "p").exists()
