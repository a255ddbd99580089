"""Policy directories in the BentoML model store (so `bentoml build` can package them by tag).

    python -m services.model_store save policies/halfcheetah_2x3 --name lorasa-halfcheetah
    LORASA_MODEL_TAG=lorasa-halfcheetah:latest bentoml serve

The model holds the validated policy files unchanged (policy.json, backbone.safetensors,
adapters/*.safetensors, digests.json; no pickle). A policy that fails validation: one line on stderr,
exit status 2, nothing saved. Labels carry the backbone fingerprint and the agent ids.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import bentoml

from lorasa_serve.artifacts import ADAPTER_DIR, BACKBONE_FILE, DIGESTS_FILE, SPEC_FILE, load_policy
from lorasa_serve.cli import ArgumentParser, run_cli


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
            if (src / DIGESTS_FILE).exists():
                shutil.copy2(src / DIGESTS_FILE, dst / DIGESTS_FILE)
            (dst / ADAPTER_DIR).mkdir()
            for agent in adapters:
                f = f"{agent}.safetensors"
                shutil.copy2(src / ADAPTER_DIR / f, dst / ADAPTER_DIR / f)
        load_policy(dst)  # what was copied is what was validated (an error here saves no model)
    return str(model.tag)


def policy_dir_from_tag(tag: str) -> Path:
    """The directory of a stored policy (raises bentoml.exceptions.NotFound for an unknown tag)."""
    return Path(bentoml.models.get(tag).path)


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="services.model_store", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, help="what to do")
    s = sub.add_parser("save", help="validate a policy directory and save it to the model store")
    s.add_argument("policy_dir", help="the policy directory to save")
    s.add_argument("--name", required=True, help="model name, e.g. lorasa-halfcheetah")
    return ap


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    print(save_to_store(args.policy_dir, args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every bad policy (any LorasaError) or argument: one line on stderr, exit status 2."""
    return run_cli("services.model_store", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
