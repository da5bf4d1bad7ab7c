"""``tandem bench``: start a verifier and the link emulator in-process, run, score, report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandemspec.bench.figures import continuations, headline, hidden_shares, mode_figures, run_rows
from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.bench.prompts import PROMPTS_FILE, load_prompts
from tandemspec.bench.report import machine_info, package_versions, write_json, write_markdown, write_plots
from tandemspec.bench.runner import (
    AUTO_TREE_MODES,
    BASELINE_MODE,
    CHAIN_FAMILY,
    TREE_FAMILY,
    BenchConfig,
    ModePlan,
    Progress,
    PromptRun,
    plan_modes,
    run_load,
    run_modes,
)
from tandemspec.edge.bundle import default_bundle_dir, load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.tokenizer import EdgeTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSizes:
    """How big a run is: the full default, or ``--quick`` (under 3 minutes on 2 CPU cores)."""

    num_prompts: int | None  # None = every prompt
    max_new_tokens: int
    rtts_ms: tuple[float, ...]
    concurrency: tuple[int, ...]
    num_assisted_prompts: int
    gate_qualities: tuple[float, ...]  # quality floors of the gated operating points


FULL = RunSizes(None, 64, (0.0, 20.0, 80.0), (1, 4, 16), 4, BenchConfig.gate_qualities)
QUICK = RunSizes(6, 32, (0.0, 40.0), (1, 4), 2, (0.7, 0.9))


def parse_list(text: str, kind: type[float] | type[int] | type[str]) -> tuple[Any, ...]:
    """``"0,20,80"`` -> ``(0.0, 20.0, 80.0)`` (or ints, or stripped strings)."""
    return tuple(kind(part.strip()) for part in text.split(",") if part.strip())


def pair_dirs(pair: str) -> tuple[Path, Path, Path]:
    """(target, drafter, edge bundle) folders of a pair folder, or of the bundled reference pair."""
    root = default_bundle_dir().parent if pair == "default" else Path(pair)
    dirs = (root / "target", root / "drafter", root / "edge")
    for path in dirs:
        if not path.is_dir():
            raise ValueError(f"{root} lacks {path.name}/ (a pair folder holds target/, drafter/ and edge/)")
    return dirs


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The bench configuration from the command line (``--quick`` sets smaller defaults)."""
    sizes = QUICK if args.quick else FULL
    target, drafter, bundle = pair_dirs(args.pair)
    prompts = load_prompts(args.prompts or PROMPTS_FILE)
    if sizes.num_prompts is not None:
        prompts = prompts[: sizes.num_prompts]
    modes = parse_list(args.modes, str) if args.modes else BenchConfig.modes
    chain_lengths = parse_list(args.chain_lengths, int) if args.chain_lengths else ()
    tree_budgets = parse_list(args.tree_budget, int) if args.tree_budget else ()
    # Sizes given for a family run it, whether or not --modes names it (trees: unless it names an auto-tree mode).
    named = {*modes, *((TREE_FAMILY,) if set(AUTO_TREE_MODES) & set(modes) else ())}
    modes += tuple(
        f for f, sizes in ((CHAIN_FAMILY, chain_lengths), (TREE_FAMILY, tree_budgets)) if sizes and f not in named
    )
    return BenchConfig(
        target_dir=target,
        drafter_dir=drafter,
        bundle_dir=bundle,
        prompts=tuple(prompts),
        modes=modes,
        rtts_ms=parse_list(args.rtt_ms, float) if args.rtt_ms else sizes.rtts_ms,
        concurrency=parse_list(args.concurrency, int) if args.concurrency else sizes.concurrency,
        max_new_tokens=args.max_new_tokens or sizes.max_new_tokens,
        num_assisted_prompts=sizes.num_assisted_prompts,
        gate_kinds=parse_list(args.gate_kinds, str) if args.gate_kinds else BenchConfig.gate_kinds,
        gate_qualities=parse_list(args.gate_qualities, float) if args.gate_qualities else sizes.gate_qualities,
        gate_check_every=BenchConfig.gate_check_every if args.gate_check_every is None else args.gate_check_every,
        draft_length=args.draft_length or BenchConfig.draft_length,
        chain_lengths=chain_lengths,
        tree_budgets=tree_budgets,
        target_device=args.device or BenchConfig.target_device,
        target_dtype=args.dtype or BenchConfig.target_dtype,
    )


def stderr_progress(message: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Measured:
    """What the timed part produced: the plan it ran, every generation, the load test, the verifier's hardware."""

    plan: ModePlan
    runs: list[PromptRun]
    load: list[dict[str, Any]]
    verifier: dict[str, str]  # the device and dtype the verifier reported (its Info)


def measure(config: BenchConfig, progress: Progress) -> Measured:
    """The timed part: a verifier and a link in-process, every mode, then the load test."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    bundle = load_bundle(config.bundle_dir)
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    encoded = [tokenizer.encode_prompt(prompt) for prompt in config.prompts]
    plan = plan_modes(config, bundle.gate_path)
    for name, reason in plan.skipped.items():
        progress(f"skipping {name}: {reason}")
    if plan.gated_points:
        progress(f"{len(plan.gated_points)} gated operating points")
    progress(f"starting a verifier for {config.target_dir}")
    cloud_config = CloudConfig(
        model_dir=config.target_dir, port=0, device=config.target_device, dtype=config.target_dtype
    )
    with serve_in_thread(cloud_config) as server:
        verifier = verifier_hardware(server.address)
        progress(f"verifier on {verifier['device']} in {verifier['dtype']}")
        link = run_in_thread(server.host, server.port, LinkConfig(rtt_ms=config.rtts_ms[0]))
        try:
            runs = run_modes(config, plan, server, link, encoded, progress)
            load = [dataclasses.asdict(r) for r in run_load(config, server, link, encoded, progress)]
        finally:
            link.stop()
    return Measured(plan, runs, load, verifier)


def verifier_hardware(address: str) -> dict[str, str]:
    """The device and dtype the verifier at ``address`` runs the target in, from its Info."""
    client = VerifierClient(ClientConfig(address=address))
    try:
        info = client.ensure_connected()
    finally:
        client.close()
    return {"device": info.device, "dtype": info.dtype}


def score(config: BenchConfig, runs: Sequence[PromptRun], progress: Progress) -> tuple[dict[Any, Any], Any]:
    """The target's NLL of every distinct continuation, and the assisted-generation reference."""
    from tandemspec.bench.scoring import load_causal_lm, run_assisted, score_continuations
    from tandemspec.federated.distill.model import is_draft_head_dir

    progress("scoring continuations with the target")
    target = load_causal_lm(config.target_dir)
    pairs = continuations(runs)
    nll = dict(zip(pairs, score_continuations(target, pairs), strict=True))
    greedy = {r.prompt_index: (r.prompt_ids, r.token_ids) for r in runs if r.mode == BASELINE_MODE}
    picked = [greedy[i] for i in sorted(greedy)][: config.num_assisted_prompts]
    if not picked:
        return nll, None
    if is_draft_head_dir(config.drafter_dir):  # transformers' assisted generation needs a plain causal LM
        progress(f"assisted generation skipped: {config.drafter_dir} is a reduced-head drafter (tandem distill)")
        return nll, None
    progress(f"transformers assisted generation on {len(picked)} prompts")
    drafter = load_causal_lm(config.drafter_dir)
    assisted = run_assisted(target, drafter, [p for p, _ in picked], [t for _, t in picked], config.max_new_tokens)
    return nll, dataclasses.asdict(assisted)


def run_bench(config: BenchConfig, out: Path, command: str, progress: Progress = stderr_progress) -> dict[str, Any]:
    """Run, score and write ``results.json``, ``results.md`` and the plots into ``out``."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    measured = measure(config, progress)
    plan, runs, load = measured.plan, measured.runs, measured.load
    nll, assisted = score(config, runs, progress)
    figures = mode_figures(runs, nll)
    gated_points = [dataclasses.asdict(point) for point in plan.gated_points]
    config_dict = dataclasses.asdict(config) | {"num_prompts": len(config.prompts)}
    config_dict.pop("prompts")
    results: dict[str, Any] = {
        "command": command,
        "config": config_dict,
        "machine": machine_info() | {"verifier": measured.verifier},
        "versions": package_versions(),
        "modes": list(figures),
        "skipped_modes": plan.skipped,
        "gated_points": gated_points,
        "rtts_ms": [f"{r:g}" for r in config.rtts_ms],
        "figures": figures,
        "headline": headline(figures, load, gated_points),
        "hidden_share": hidden_shares(runs),
        "runs": run_rows(runs),
        "load": load,
        "assisted_reference": assisted,
        "wall_s": time.perf_counter() - started,
    }
    write_json(out / "results.json", results)
    write_markdown(out / "results.md", results)
    write_plots(out, results)
    progress(f"wrote {out}/results.json, results.md and plots in {results['wall_s']:.0f} s")
    return results


def bench_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem bench``."""
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as error:
        print(f"tandem bench: {error}", file=sys.stderr)
        return 1
    command = "tandem " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "tandem bench"
    run_bench(config, args.out, command)
    print(args.out / "results.md")
    return 0
