"""env.json has one reader and writer (lorasa_serve/env_file.py), used by training, lorasa-eval and
the exporters."""
from __future__ import annotations

import json

import pytest
from conftest import make_policy

from lorasa_serve import ArtifactError
from lorasa_serve.env_file import (ENV_FILE, EnvFileMissingError, env_block_or_guess, read_env_block,
                                   write_env_file)


def test_round_trip_keeps_provenance(tmp_path):
    block = {"kind": "smax", "scenario": "3s5z", "episode_limit": 100}
    write_env_file(tmp_path, block, trained_by="lorasa-train", seed=3)
    assert json.loads((tmp_path / ENV_FILE).read_text()) == {"env": block, "trained_by": "lorasa-train",
                                                            "seed": 3}
    assert read_env_block(tmp_path) == block


def test_trainer_reads_and_writes_through_it(tmp_path):
    from training.envs import EnvConfig
    from training.trainer import read_env_json
    cfg = EnvConfig(scenario="Walker2d", agent_conf="2x3", n_envs=3)
    write_env_file(tmp_path, cfg.env_block())
    assert read_env_json(tmp_path).env_block() == cfg.env_block()


def test_missing_is_typed_and_a_file_not_found(tmp_path):
    with pytest.raises(EnvFileMissingError, match="env.json: is missing") as info:
        read_env_block(tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ArtifactError)


@pytest.mark.parametrize("text,match", [("{oops", "unreadable"), ('["env"]', "no known environment kind"),
                                        ('{"env": {"kind": "atari"}}', "no known environment kind")])
def test_bad_files(tmp_path, text, match):
    (tmp_path / ENV_FILE).write_text(text)
    with pytest.raises(ArtifactError, match=match):
        read_env_block(tmp_path)
    block, note = env_block_or_guess(tmp_path, make_policy(tmp_path / "p")[0])
    assert block is None and match in note and "random observations only" in note


def test_bare_mamujoco_block_gets_defaults(tmp_path):
    (tmp_path / ENV_FILE).write_text(json.dumps({"kind": "mamujoco", "scenario": "Ant", "agent_conf": "4x2"}))
    assert read_env_block(tmp_path) == {"kind": "mamujoco", "scenario": "Ant", "agent_conf": "4x2",
                                        "agent_obsk": 1}


def test_halfcheetah_guess_only_for_its_sizes(tmp_path):
    spec = make_policy(tmp_path / "hc", obs=(12, 12), act=(3, 3))[0]
    block, note = env_block_or_guess(tmp_path / "hc", spec)
    assert block["scenario"] == "HalfCheetah" and "match HalfCheetah 2x3" in note
    spec = make_policy(tmp_path / "cat", obs=(12, 12), act=(3, 3), action="categorical")[0]
    assert env_block_or_guess(tmp_path / "cat", spec)[0] is None
