"""Federated evaluation by real decoding: a device's held-out prompts through the verifier with a bundle.

Per device: ``lossless`` decoding with a fixed draft length (the fleet mean accepted length:
tokens committed per verified round, the correction or bonus included) and ``gated``
decoding at a given learned-gate threshold (target passes per generated token, and how
much of the lossless output - the target's own greedy text - it reproduces, position by
position, as the measured quality). Sums come back, so the server's means are
token-weighted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime


@dataclass(frozen=True)
class EvalConfig:
    """How held-out prompts are decoded."""

    draft_length: int = 4
    max_new_tokens: int = 48
    gated: bool = True


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

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def metrics(self) -> dict[str, float]:
        """Means of these sums (and the number of prompts)."""
        return {
            "num-prompts": self.num_prompts,
            "accepted-length": self.lossless_committed / max(self.lossless_rounds, 1),
            "lossless-passes-per-token": self.lossless_passes / max(self.lossless_tokens, 1),
            "gated-passes-per-token": self.gated_passes / max(self.gated_tokens, 1),
            "gated-match": self.gated_matching / max(self.gated_tokens, 1),
        }


def evaluate_bundle(
    bundle_dir: Path, cloud: str, prompts: Sequence[str], gate_threshold: float | None, config: EvalConfig
) -> EvalSums:
    """Decode ``prompts`` losslessly, then gated at ``gate_threshold`` (skipped when None)."""
    lossless = EdgeConfig(
        cloud=cloud, bundle=bundle_dir, mode="lossless", draft_length=config.draft_length, pipeline=False
    )
    outputs: list[tuple[int, ...]] = []
    rounds = committed = tokens = passes = up = down = 0
    with EdgeRuntime(lossless) as runtime:
        for prompt in prompts:
            request = GenerationRequest(runtime.tokenizer.encode_prompt(prompt), max_new_tokens=config.max_new_tokens)
            result = runtime.decoder.generate(request)
            stats = result.stats
            if stats.fell_back_to_local:
                raise RuntimeError(f"the verifier failed during evaluation: {stats.fallback_reason}")
            outputs.append(tuple(result.token_ids))
            rounds += stats.num_rounds
            committed += round(stats.mean_accepted_length * stats.num_rounds)
            tokens += stats.num_generated
            passes += stats.num_target_passes
            up += stats.bytes_up
            down += stats.bytes_down
    gated_tokens = gated_passes = matching = 0
    if config.gated and gate_threshold is not None:
        gated = EdgeConfig(
            cloud=cloud,
            bundle=bundle_dir,
            mode="gated",
            draft_length=config.draft_length,
            pipeline=False,
            gate_threshold=gate_threshold,
        )
        with EdgeRuntime(gated) as runtime:
            for prompt, reference in zip(prompts, outputs, strict=True):
                request = GenerationRequest(
                    runtime.tokenizer.encode_prompt(prompt), max_new_tokens=config.max_new_tokens
                )
                result = runtime.decoder.generate(request)
                ids = tuple(result.token_ids)
                gated_tokens += len(ids)
                gated_passes += result.stats.num_target_passes
                matching += sum(a == b for a, b in zip(ids, reference, strict=False))
                up += result.stats.bytes_up
                down += result.stats.bytes_down
    return EvalSums(len(prompts), rounds, committed, tokens, passes, gated_tokens, gated_passes, matching, up, down)
