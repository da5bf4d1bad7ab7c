"""``tandem distill``: train a drafter for any Hugging Face causal-LM target, then report and export it.

Training (resumable, see :mod:`~tandemspec.federated.distill.train`) writes checkpoints and
scored chunks under ``--work-dir``; when it stops (``--steps``, ``--minutes``, or SIGTERM)
the drafter folder, held-out report, edge bundle and model card are written to ``--out``.
``--report-only`` skips training and reports the latest checkpoint (e.g. while a
background run continues).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict

from tandemspec.federated.distill.model import cut_layer_drafter
from tandemspec.federated.distill.report import (
    REPORT_NAME,
    DrafterFigures,
    export_plain,
    measure,
    model_card,
    write_report,
)
from tandemspec.federated.distill.train import SOURCES, DistillConfig, Distiller, DrafterShape, default_shape

logger = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The run's configuration from ``tandem distill`` flags (shape defaults from the target's size)."""
    from transformers import AutoConfig

    target_config = AutoConfig.from_pretrained(args.target)
    shape = default_shape(target_config)
    shape = DrafterShape(
        num_layers=args.layers or shape.num_layers,
        draft_vocab_size=min(args.draft_vocab or shape.draft_vocab_size, int(target_config.vocab_size)),
    )
    mix = tuple(args.mix.split(",")) if args.mix else DistillConfig.mix
    unknown = [m for m in mix if m not in SOURCES]
    if unknown:
        raise ValueError(f"unknown --mix sources {unknown}; choose among {', '.join(SOURCES)}")
    return DistillConfig(
        target_dir=args.target,
        work_dir=args.work_dir or args.out / "work",
        out_dir=args.out,
        shape=shape,
        corpus_files=tuple(args.corpus or ()),
        doc_root=args.doc_root,
        seed=args.seed,
        threads=args.threads,
        objective=args.objective,
        mix=mix,
        max_steps=args.steps,
        max_minutes=args.minutes,
        eval_every_steps=args.eval_every,
        rows_per_chunk=args.rows_per_chunk,
        replay_chunks=args.replay,
        seq_len=args.seq_len,
        answer_tokens=args.answer_tokens,
        eval_prompts=args.eval_prompts,
        eval_answer_tokens=args.eval_answer_tokens,
    )


def head_coverage(distiller: Distiller) -> float:
    """Share of the held-out answer tokens that the draft head can propose (an upper bound on agreement)."""
    head = set(distiller.draft_ids.tolist())
    tokens = [t for answer in distiller.held_out.chat_answers for t in answer]
    return sum(t in head for t in tokens) / max(1, len(tokens))


def report(distiller: Distiller, baselines: tuple[int, ...], export: bool, command: str) -> dict[str, object]:
    """Held-out figures of the latest drafter beside cut-layer baselines; bundle and card into ``out_dir``."""
    from tandemspec.federated.distill.bundle import export_draft_bundle

    config = distiller.config
    started = time.perf_counter()
    drafter = distiller.load_checkpoint_drafter()
    drafter_dir = distiller.publish(drafter)
    edge_dir = config.out_dir / "edge"
    if export:
        export_draft_bundle(drafter_dir, edge_dir)
    figures: list[DrafterFigures] = [
        measure("distilled", drafter, distiller.held_out, edge_dir if export else None, config.threads)
    ]
    cached_path = config.work_dir / "baselines.json"
    cached = json.loads(cached_path.read_text()) if cached_path.exists() else {}
    for layers in baselines:
        key = f"{layers}{'' if export else '-no-export'}"
        if key not in cached:  # baselines do not change while the drafter trains: measure each once
            cut = cut_layer_drafter(distiller.target, layers)
            bundle = None
            if export:
                bundle = config.work_dir / f"cut-{layers}-edge"
                export_plain(cut, config.target_dir, bundle)
            name = f"cut-layer, {layers} layers, full head"
            cached[key] = asdict(measure(name, cut, distiller.held_out, bundle, config.threads))
            cached_path.write_text(json.dumps(cached, indent=2) + "\n")
        stored = cached[key]
        accepted = {int(k): v for k, v in stored["mean_accepted_length"].items()}  # JSON keys are strings
        figures.append(DrafterFigures(**(stored | {"mean_accepted_length": accepted})))
    state = distiller.loaded_checkpoint  # the checkpoint the figures were measured on
    evals = (
        (config.work_dir / "eval.jsonl").read_text().splitlines() if (config.work_dir / "eval.jsonl").exists() else []
    )
    training = {
        "steps": state["step"],
        "train_minutes": round(float(state["elapsed_s"]) / 60, 1),
        "tokens_trained": state["tokens"],
        "shape": {"num_layers": config.shape.num_layers, "draft_vocab_size": config.shape.draft_vocab_size},
        "objective": config.objective,
        "mix": list(config.mix),
        "draft_head_covers_held_out_answer_tokens": round(head_coverage(distiller), 4),
        "held_out_chat_answers": len(distiller.held_out.chat_answers),
        "held_out_answer_tokens": sum(len(a) for a in distiller.held_out.chat_answers),
        "eval_history": [json.loads(line) for line in evals],
        "report_seconds": round(time.perf_counter() - started),
    }
    path = config.out_dir / REPORT_NAME
    write_report(figures, training, path)
    data = json.loads(path.read_text())
    (config.out_dir / "README.md").write_text(model_card(data, command))
    return data


def distill_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem distill``."""
    logging.getLogger("tandemspec").setLevel(logging.INFO)
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as error:
        print(f"tandem distill: {error}", file=sys.stderr)
        return 1
    distiller = Distiller(config)
    if not args.report_only:
        distiller.train()
        if args.no_report:
            return 0
    baselines = tuple(int(n) for n in args.baselines.split(",")) if args.baselines else ()
    command = "tandem distill " + shlex.join(sys.argv[2:] if len(sys.argv) > 2 else [])
    data = report(distiller, baselines, export=not args.no_export, command=command)
    drafters = data["drafters"]
    assert isinstance(drafters, list)
    for figures in drafters:
        print(json.dumps(figures))
    print(f"drafter, report and bundle written to {config.out_dir}")
    return 0
