"""`lorasa-export POLICY_DIR --out OUT [--merge] [--agents a,b] [--format safetensors,onnx] [--opset N]`,
or `lorasa-export POLICY_DIR --out OUT --peft [--agents a,b]` (PEFT adapter directories, OUT/peft/<agent>).

Prints a progress bar, then a summary table (agent, files, sizes, max abs diff vs the Engine).
Exit status: 0 all artifacts verified, 1 some verification failed (those files are not written),
2 bad arguments or an unusable policy directory (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorasa_serve.cli import ArgumentParser, run_cli

from .pipeline import MIN_STEPS, ExportConfig, export_policy
from .verify import VerifyConfig


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="lorasa-export", description=__doc__.split("\n\n")[0])
    p.add_argument("policy_dir", type=Path, help="the policy directory to export")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--merge", action="store_true",
                   help="per-agent merged artifacts; without it: one multi-agent ONNX graph")
    p.add_argument("--peft", action="store_true",
                   help="per-agent PEFT adapter directories OUT/peft/<agent> (adapter_config.json + "
                        "adapter_model.safetensors) for lorasa_serve.torch_module.ActorModule")
    p.add_argument("--agents", type=_csv, default=None,
                   help="comma-separated agent ids (with --merge or --peft)")
    p.add_argument("--format", dest="formats", type=_csv, default=None,
                   help="comma-separated: safetensors,onnx (default: both with --merge, onnx without)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the written graphs")
    p.add_argument("--lora-impl", choices=("auto", "dense", "gather"), default="auto",
                   help="multi-agent graph: dense one-hot LoRA or per-row gather (auto by agents*rank)")
    p.add_argument("--steps", type=int, default=24, help=f"verification rollout steps (>= {MIN_STEPS})")
    p.add_argument("--envs", type=int, default=4, help="environments per verification step")
    p.add_argument("--tol", type=float, default=1e-5, help="max abs difference vs the engine (CPU fp32)")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="also allow rtol * |engine value| (for policies with large outputs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the verification rollout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None) -> ExportConfig:
    a = parser().parse_args(argv)
    return ExportConfig(a.policy_dir, a.out, a.merge, a.agents, a.formats, a.opset, a.lora_impl,
                        VerifyConfig(tol=a.tol, rtol=a.rtol), a.steps, a.envs, seed=a.seed,
                        progress=not a.no_progress, peft=a.peft)


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def run(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = export_policy(cfg)  # ExportError/ArtifactError: before anything is written
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    for r in report.results:
        if r.error:
            print(f"lorasa-export: FAILED {r.agent} {r.kind}: {r.error}", file=sys.stderr)
    print(f"wrote {report.out}" + ("" if report.ok else " (with failures)"))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli("lorasa-export", run, argv)


if __name__ == "__main__":
    sys.exit(main())
