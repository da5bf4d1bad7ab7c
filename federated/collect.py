"""``tandem gate collect``: device logs of a model pair over its training corpus, for gate training.

The shipped gate is trained on logs this command writes: an in-process verifier holds the
pair's target, an edge with the pair's bundle decodes ``def`` prefixes drawn from the
*training* split of the reference corpus (:func:`tandemspec.federated.reference.corpus.split_corpus`;
the bench's held-out prompts come from the validation split, so gate evaluation on the
bench never sees its training text) in ``lossless`` mode with a fixed draft length, and
every verified token lands in the device log with its features and the cloud's label.

    tandem gate collect --log runs/gate/logs.db [--pair models/reference] [--num-prompts 1000]
    tandem gate train --log runs/gate/logs.db --out models/reference/edge-gate

A fixed draft length (no gate) keeps the logs independent of any earlier gate; a longer
one (8) puts positions 0..7 in the data, which gated mode's capped position feature uses.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandemspec.bench.prompts import def_prefixes
from tandemspec.edge.bundle import default_bundle_dir
from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime
from tandemspec.federated.reference.corpus import split_corpus
from tandemspec.types import DecodeMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectConfig:
    """What to decode and where to log it."""

    log_db: Path
    target_dir: Path
    bundle_dir: Path
    num_prompts: int = 1000
    max_new_tokens: int = 64
    draft_length: int = 8
    seed: int = 0
    return_top_k: int = 0  # also log the target's top-k per token (soft labels, drafter distillation)
    mode: DecodeMode = "lossless"  # or "gated": the bundle's gate decides (trusted tokens get labels too)
    gate_quality: float | None = None  # gated: the operating point (None = the default floor)


@dataclass(frozen=True)
class CollectSummary:
    num_prompts: int
    num_tokens: int
    num_rounds: int
    num_accepted: int
    num_drafted: int
    num_trusted: int  # gated: tokens emitted on the gate's trust (logged with the cloud's labels once sent)
    wall_s: float


def training_prompts(num_prompts: int, seed: int) -> list[str]:
    """``def`` prefixes from the reference corpus's training split (never the held-out ``email/``)."""
    prompts = def_prefixes(split_corpus().train, num_prompts, seed)
    if len(prompts) < num_prompts:
        logger.warning("the training split holds only %d prompts", len(prompts))
    return prompts


def collect(config: CollectConfig, prompts: Sequence[str] | None = None, cloud: str | None = None) -> CollectSummary:
    """Decode prompts (default: the training prompts) through a verifier, logging every verified token.

    ``cloud``: a running verifier's address; None starts a local one on ``config.target_dir``.
    """
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    if prompts is None:
        prompts = training_prompts(config.num_prompts, config.seed)
    server = None
    if cloud is None:
        server = serve_in_thread(CloudConfig(model_dir=config.target_dir, host="127.0.0.1", port=0))
        cloud = server.address
    edge = EdgeConfig(
        cloud=cloud,
        bundle=config.bundle_dir,
        mode=config.mode,
        gate_quality=config.gate_quality,
        draft_length=config.draft_length,
        pipeline=False,
        log_db=config.log_db,
        return_top_k=config.return_top_k,
    )
    tokens = rounds = accepted = drafted = trusted = 0
    start = time.perf_counter()
    try:
        with EdgeRuntime(edge) as runtime:
            for index, prompt in enumerate(prompts):
                prompt_ids = runtime.tokenizer.encode_prompt(prompt)
                request = GenerationRequest(prompt_ids, max_new_tokens=config.max_new_tokens)
                stats = runtime.decoder.generate(request).stats
                if stats.fell_back_to_local:
                    raise RuntimeError(f"prompt {index}: the local verifier failed: {stats.fallback_reason}")
                tokens += stats.num_generated
                rounds += stats.num_rounds
                accepted += stats.num_accepted
                drafted += stats.num_drafted
                trusted += stats.num_trusted
                if (index + 1) % 50 == 0:
                    logger.info("%d/%d prompts, %d tokens logged", index + 1, len(prompts), drafted)
    finally:
        if server is not None:
            server.stop()
    return CollectSummary(len(prompts), tokens, rounds, accepted, drafted, trusted, time.perf_counter() - start)


def collect_main(args: argparse.Namespace) -> int:
    """``tandem gate collect``."""
    pair: Path = args.pair or default_bundle_dir().parent
    config = CollectConfig(
        log_db=args.log,
        target_dir=pair / "target",
        bundle_dir=pair / "edge",
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        draft_length=args.draft_length,
        seed=args.seed,
        return_top_k=args.return_top_k,
        mode=args.mode,
        gate_quality=args.gate_quality,
    )
    summary = collect(config)
    print(
        f"logged {summary.num_drafted} verified draft tokens ({summary.num_accepted} accepted) and "
        f"{summary.num_trusted} trusted ones from "
        f"{summary.num_prompts} training prompts, {summary.num_tokens} generated tokens, "
        f"{summary.num_rounds} rounds, in {summary.wall_s:.0f} s -> {config.log_db}"
    )
    return 0
