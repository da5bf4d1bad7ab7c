"""Federated evaluation by real decoding: a device's held-out prompts through the verifier with a bundle.

Per device: ``lossless`` decoding with a fixed draft length (the fleet mean accepted length:
tokens committed per verified round, the correction or bonus included) and ``gated``
decoding at a given learned-gate threshold (target passes per generated token, and how
much of the lossless output - the target's own greedy text - it reproduces, position by
position, as the measured quality). With a scorer (the target's weights where the
evaluation runs) each continuation is also scored by the target's NLL, and the drafter's
own output (``local`` decoding) too, for the bench's *quality recovered*:
(NLL_local - NLL_gated) / (NLL_local - NLL_lossless). Sums come back, so the server's means
are token-weighted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

# (prompt ids, continuation ids) pairs -> the target's summed NLL of each continuation
Scorer = Callable[[Sequence[tuple[tuple[int, ...], tuple[int, ...]]]], list[float]]


@dataclass(frozen=True)
class EvalConfig:
    """How held-out prompts are decoded."""

    draft_length: int = 4
    max_new_tokens: int = 48
    gated: bool = True
    score_nll: bool = True  # score continuations with the pair's target (needs its weights where evaluation runs)


@dataclass(frozen=True)
class EvalSums:
    """Sums over a device's held-out prompts (add across devices, then divide)."""

    num_prompts: int
    lossless_rounds: int
    lossless_committed: int  # tokens committed by verified rounds (accepted + correction/bonus)
    lossless_tokens: int
    lossless_passes: int
    gated_tokens: int
    gated_passes: int
    gated_matching: int  # gated tokens equal to the lossless output at the same index
    bytes_up: int
    bytes_down: int
    local_tokens: int = 0  # drafter-only tokens (scored runs only)
    nll_lossless: float = 0.0  # the target's summed NLL of each mode's continuations (scored runs only)
    nll_gated: float = 0.0
    nll_local: float = 0.0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def metrics(self) -> dict[str, float]:
        """Means of these sums (and the number of prompts); NLLs and quality recovered when scored."""
        values = {
            "num-prompts": self.num_prompts,
            "accepted-length": self.lossless_committed / max(self.lossless_rounds, 1),
            "lossless-passes-per-token": self.lossless_passes / max(self.lossless_tokens, 1),
            "gated-passes-per-token": self.gated_passes / max(self.gated_tokens, 1),
            "gated-match": self.gated_matching / max(self.gated_tokens, 1),
        }
        if self.local_tokens and self.lossless_tokens:
            target = self.nll_lossless / self.lossless_tokens
            drafter = self.nll_local / self.local_tokens
            values.update({"nll-lossless": target, "nll-local": drafter})
            if self.gated_tokens:
                gated = self.nll_gated / self.gated_tokens
                values["nll-gated"] = gated
                if abs(drafter - target) > 1e-9:
                    values["quality-recovered"] = (drafter - gated) / (drafter - target)
        return values


def target_scorer(target_dir: Path) -> Scorer:
    """The target's NLL of continuations, as ``tandem bench`` scores them (one model load)."""
    from tandemspec.bench.scoring import load_causal_lm, score_continuations

    model = load_causal_lm(target_dir)

    def score(pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[float]:
        return [s.total_nll for s in score_continuations(model, pairs)]

    return score


@dataclass(frozen=True)
class Decoded:
    """One mode's outputs over the prompts, with its counters."""

    outputs: tuple[tuple[int, ...], ...]
    generated: int = 0  # the stats' generated tokens
    rounds: int = 0
    committed: int = 0
    passes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


def decode(
    bundle_dir: Path,
    cloud: str | None,
    prompt_ids: Sequence[tuple[int, ...]],
    config: EvalConfig,
    mode: str,
    gate_threshold: float | None = None,
) -> Decoded:
    """Decode every prompt in one mode (``lossless``, ``gated`` at ``gate_threshold``, or ``local``)."""
    edge = EdgeConfig(
        cloud=None if mode == "local" else cloud,
        bundle=bundle_dir,
        mode=mode,  # type: ignore[arg-type]
        draft_length=config.draft_length,
        pipeline=False,
        gate_threshold=gate_threshold,
    )
    outputs: list[tuple[int, ...]] = []
    generated = rounds = committed = passes = up = down = 0
    with EdgeRuntime(edge) as runtime:
        for ids in prompt_ids:
            result = runtime.decoder.generate(GenerationRequest(ids, max_new_tokens=config.max_new_tokens))
            stats = result.stats
            if mode != "local" and stats.fell_back_to_local:
                raise RuntimeError(f"the verifier failed during evaluation: {stats.fallback_reason}")
            outputs.append(tuple(result.token_ids))
            generated += stats.num_generated
            rounds += stats.num_rounds
            committed += round(stats.mean_accepted_length * stats.num_rounds)
            passes += stats.num_target_passes
            up += stats.bytes_up
            down += stats.bytes_down
    return Decoded(tuple(outputs), generated, rounds, committed, passes, up, down)


def matching(outputs: Sequence[tuple[int, ...]], references: Sequence[tuple[int, ...]]) -> int:
    """Tokens equal to the reference output at the same index."""
    return sum(sum(a == b for a, b in zip(o, r, strict=False)) for o, r in zip(outputs, references, strict=True))


def encode_prompts(bundle_dir: Path, prompts: Sequence[str]) -> list[tuple[int, ...]]:
    """The prompts as the bundle's tokenizer encodes them."""
    from tandemspec.edge.bundle import load_bundle
    from tandemspec.edge.tokenizer import EdgeTokenizer

    tokenizer = EdgeTokenizer.from_bundle(load_bundle(bundle_dir, verify_hashes=False))
    return [tokenizer.encode_prompt(p) for p in prompts]


def total_nll(scorer: Scorer, prompt_ids: Sequence[tuple[int, ...]], outputs: Sequence[tuple[int, ...]]) -> float:
    """The target's summed NLL over the non-empty continuations."""
    pairs = [(p, o) for p, o in zip(prompt_ids, outputs, strict=True) if o]
    return float(sum(scorer(pairs))) if pairs else 0.0


def evaluate_bundle(
    bundle_dir: Path,
    cloud: str,
    prompts: Sequence[str],
    gate_threshold: float | None,
    config: EvalConfig,
    scorer: Scorer | None = None,
) -> EvalSums:
    """Decode ``prompts`` losslessly, then gated at ``gate_threshold`` (skipped when None); score with ``scorer``."""
    thresholds = [gate_threshold] if config.gated and gate_threshold is not None else []
    by_threshold = evaluate_thresholds(bundle_dir, cloud, prompts, thresholds, config, scorer)
    return by_threshold[gate_threshold] if thresholds else by_threshold[None]


def evaluate_thresholds(
    bundle_dir: Path,
    cloud: str,
    prompts: Sequence[str],
    thresholds: Sequence[float],
    config: EvalConfig,
    scorer: Scorer | None = None,
) -> dict[float | None, EvalSums]:
    """Lossless (and, scored, local) decoding once, gated decoding at each threshold: sums per threshold.

    Key None holds the lossless part alone (no gated tokens), for an empty ``thresholds``.
    """
    ids = encode_prompts(bundle_dir, prompts)
    lossless = decode(bundle_dir, cloud, ids, config, "lossless")
    scored: dict[str, float | int] = {}
    if scorer is not None:
        local = decode(bundle_dir, None, ids, config, "local")
        scored = {
            "local_tokens": local.num_tokens,
            "nll_lossless": total_nll(scorer, ids, lossless.outputs),
            "nll_local": total_nll(scorer, ids, local.outputs),
        }

    def sums(gated: Decoded, nll_gated: float) -> EvalSums:
        return EvalSums(
            num_prompts=len(prompts),
            lossless_rounds=lossless.rounds,
            lossless_committed=lossless.committed,
            lossless_tokens=lossless.generated,
            lossless_passes=lossless.passes,
            gated_tokens=gated.num_tokens,
            gated_passes=gated.passes,
            gated_matching=matching(gated.outputs, lossless.outputs) if gated.outputs else 0,
            bytes_up=lossless.bytes_up + gated.bytes_up,
            bytes_down=lossless.bytes_down + gated.bytes_down,
            nll_gated=nll_gated,
            **scored,  # type: ignore[arg-type]
        )

    results: dict[float | None, EvalSums] = {None: sums(Decoded(()), 0.0)}
    for threshold in thresholds:
        gated = decode(bundle_dir, cloud, ids, config, "gated", threshold)
        results[threshold] = sums(gated, total_nll(scorer, ids, gated.outputs) if scorer is not None else 0.0)
    return results
