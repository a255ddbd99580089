"""AdapterBank is immutable: writers build a new bank (with an empty cache of its own) and never
touch the one in-flight forwards read."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_policy

from lorasa_serve.bank import AdapterBank
from lorasa_serve.layout import plan
from lorasa_serve.network import init_adapter


@pytest.fixture
def bank(tmp_path):
    spec, backbone, ads = make_policy(tmp_path / "p")
    return AdapterBank.build(spec, backbone, ads, torch.device("cpu"))


def test_frozen(bank):
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.merged = {}
    with pytest.raises(ValueError):  # the cache is never carried over by replace()
        dataclasses.replace(bank, cache=bank.cache)


def test_hot_swap_leaves_the_old_bank_alone(bank):
    merged = bank.with_merged([0], True)
    merged.params("lora", plan(np.array([0, 1, 2])))
    before = {k: v.clone() for k, v in merged.merged[0].items()}
    merged_dict, a_r = merged.merged, {k: v.clone() for k, v in merged.a_r.items()}
    new_adapter = init_adapter(bank.spec, torch.Generator().manual_seed(9), b_std=0.3)
    swapped = merged.with_adapter("agent_0", new_adapter)
    # the old bank: same dict, same tensors, its cache intact
    assert merged.merged is merged_dict and merged.merged.keys() == {0}
    assert all(torch.equal(before[k], merged.merged[0][k]) for k in before)
    assert all(torch.equal(a_r[k], merged.a_r[k]) for k in a_r)
    assert merged.cache.params and not swapped.cache.params  # the new bank starts with an empty cache
    # the new bank: agent_0 still merged, with the new adapter's weights
    assert swapped.merged is not merged.merged
    want = swapped.merged_weights(0)
    assert all(torch.equal(want[k], swapped.merged[0][k]) for k in want)
    assert not all(torch.equal(want[k], before[k]) for k in want)
    assert swapped.versions[0] == merged.versions[0] + 1


def test_merge_and_unmerge_build_new_banks(bank):
    merged = bank.with_merged([1], True)
    assert bank.merged == {} and merged.merged.keys() == {1} and merged.cache is not bank.cache
    assert bank.with_merged([1], False).merged == {} and merged.merged.keys() == {1}
