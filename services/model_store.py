"""Policy directories in the BentoML model store (so `bentoml build` can package them by tag).

    python -m services.model_store save policies/halfcheetah_2x3 --name lorasa-halfcheetah
    LORASA_MODEL_TAG=lorasa-halfcheetah:latest bentoml serve

The model holds the validated policy files unchanged (policy.json, backbone.safetensors,
adapters/*.safetensors; no pickle). Labels carry the backbone fingerprint and the agent ids.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import bentoml

from lorasa_serve.artifacts import ADAPTER_DIR, BACKBONE_FILE, SPEC_FILE, load_policy


def save_to_store(policy_dir: str | Path, name: str) -> str:
    """Validate `policy_dir` (full load), copy its serving files into a new model; returns the tag."""
    src = Path(policy_dir)
    spec, _, adapters = load_policy(src)
    meta = {"backbone_fingerprint": spec.backbone_fingerprint, "agents": spec.agent_ids,
            "action": spec.action, "recurrent": spec.recurrent, "lora_rank": spec.lora.rank}
    with bentoml.models.create(name, labels={"kind": "lorasa-policy"}, metadata=meta) as model:
        dst = Path(model.path)
        shutil.copy2(src / SPEC_FILE, dst / SPEC_FILE)
        shutil.copy2(src / BACKBONE_FILE, dst / BACKBONE_FILE)
        if adapters:
            (dst / ADAPTER_DIR).mkdir()
            for agent in adapters:
                f = f"{agent}.safetensors"
                shutil.copy2(src / ADAPTER_DIR / f, dst / ADAPTER_DIR / f)
    return str(model.tag)


def policy_dir_from_tag(tag: str) -> Path:
    """The directory of a stored policy (raises bentoml.exceptions.NotFound for an unknown tag)."""
    return Path(bentoml.models.get(tag).path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="validate a policy directory and save it to the model store")
    s.add_argument("policy_dir")
    s.add_argument("--name", required=True, help="model name, e.g. lorasa-halfcheetah")
    args = ap.parse_args(argv)
    print(save_to_store(args.policy_dir, args.name))


if __name__ == "__main__":
    main()
