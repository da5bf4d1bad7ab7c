"""Torch-side measurements: the target's NLL of each continuation, and transformers' assisted generation.

Both load the Hugging Face models in the bench process (CPU, float32 unless CUDA is
present); they run after the timed runs so they never compete with them for cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCORE_BATCH = 8


@dataclass(frozen=True)
class TokenNll:
    """Summed negative log-likelihood of a continuation under the target, and its length."""

    total_nll: float
    num_tokens: int


@dataclass(frozen=True)
class AssistedRun:
    """transformers assisted generation (co-located) over a few prompts."""

    num_prompts: int
    num_tokens: int
    num_target_calls: int  # target forward calls, prefill included
    mean_accepted_length: float  # generated tokens per target call
    tokens_per_s: float
    exact_match_rate: float  # vs the target's own greedy output (the cloud mode's tokens)


def load_causal_lm(model_dir: Path) -> Any:
    """A Hugging Face causal LM in eval mode, float32 (CUDA when present)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def score_continuations(
    model: Any, pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int = 0
) -> list[TokenNll]:
    """The target's NLL of each (prompt ids, continuation ids), in right-padded batches."""
    import torch

    scores: list[TokenNll] = []
    device = next(model.parameters()).device
    for start in range(0, len(pairs), SCORE_BATCH):
        batch = pairs[start : start + SCORE_BATCH]
        sequences = [list(prompt) + list(tokens) for prompt, tokens in batch]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]: position t predicts t+1
        picked = log_probs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()  # [B, T-1]
        for row, (prompt, tokens) in enumerate(batch):
            first, last = len(prompt) - 1, len(prompt) + len(tokens) - 1
            scores.append(TokenNll(float(-picked[row, first:last].sum()), len(tokens)))
    return scores


def run_assisted(
    target: Any,
    drafter: Any,
    encoded: Sequence[tuple[int, ...]],
    greedy: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    pad_id: int = 0,
) -> AssistedRun:
    """``target.generate(assistant_model=drafter)``, greedy, counting the target's forward calls."""
    import torch

    calls = [0]

    def count(module: Any, args: Any, output: Any) -> None:
        calls[0] += 1

    hook = target.register_forward_hook(count)
    device = next(target.parameters()).device
    num_tokens, matches = 0, 0
    start = time.perf_counter()
    try:
        for prompt_ids, reference in zip(encoded, greedy, strict=True):
            with torch.no_grad():
                out = target.generate(
                    torch.tensor([prompt_ids], device=device),
                    assistant_model=drafter,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                )
            tokens = tuple(int(t) for t in out[0, len(prompt_ids) :])
            num_tokens += len(tokens)
            matches += tokens == tuple(reference)
    finally:
        hook.remove()
    wall_s = time.perf_counter() - start
    return AssistedRun(
        num_prompts=len(encoded),
        num_tokens=num_tokens,
        num_target_calls=calls[0],
        mean_accepted_length=num_tokens / calls[0] if calls[0] else 0.0,
        tokens_per_s=num_tokens / wall_s if wall_s > 0 else 0.0,
        exact_match_rate=matches / len(encoded) if encoded else 0.0,
    )
