"""Held-out figures of a drafter against its target: greedy agreement and chain-speculation accepted length.

Greedy speculative decoding emits exactly the target's greedy continuation, so a round is
simulated against that continuation (computed once): the drafter proposes ``k`` tokens
greedily from the current context with its own KV cache, the longest matching prefix is
accepted and the target adds one token (the correction, or the bonus after a full match).
Mean accepted length is tokens per target pass, bonus included, as in the reference card.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

DRAFT_LENGTHS = (2, 4, 6)


@dataclass(frozen=True)
class HeldOutSet:
    """Held-out rows with the target's greedy next token at each position."""

    chat_prompts: list[list[int]]  # chat-templated prompt ids
    chat_answers: list[list[int]]  # the target's greedy answer to each
    corpus_windows: torch.Tensor  # [n, length] held-out text
    corpus_target_top: torch.Tensor  # [n, length] the target's argmax at each position


@torch.no_grad()
def greedy_agreement(model: torch.nn.Module, held_out: HeldOutSet) -> dict[str, float]:
    """Share of positions where the drafter's argmax is the target's: on chat answers and on held-out text."""
    agree, total = 0, 0
    for prompt, answer in zip(held_out.chat_prompts, held_out.chat_answers, strict=True):
        ids = torch.tensor([prompt + answer[:-1]])
        top = model(input_ids=ids).logits[0, len(prompt) - 1 :].argmax(-1)  # predicts answer[0:]
        agree += int((top == torch.tensor(answer)).sum())
        total += len(answer)
    corpus_agree, corpus_total = 0, 0
    for rows, want in zip(held_out.corpus_windows.split(4), held_out.corpus_target_top.split(4), strict=True):
        top = model(input_ids=rows).logits.argmax(-1)
        corpus_agree += int((top == want).sum())
        corpus_total += want.numel()
    return {"chat": agree / max(1, total), "text": corpus_agree / max(1, corpus_total)}


@torch.no_grad()
def chain_rounds(model: torch.nn.Module, prompt: list[int], answer: list[int], k: int) -> tuple[int, int]:
    """(tokens emitted, target passes) of greedy chain speculation with draft length ``k`` over ``answer``."""
    cache = DynamicCache(config=model.config)
    sequence = list(prompt)
    cached = 0  # tokens of ``sequence`` (then drafts) whose keys/values are in the cache
    done, rounds = 0, 0
    while done < len(answer):
        pending = torch.tensor([sequence[cached:]])
        drafts: list[int] = []
        for offset in range(k):
            logits = model(input_ids=pending, past_key_values=cache, use_cache=True).logits[0, -1]
            drafts.append(int(logits.argmax()))
            # Drafts after the first mismatch (or past the answer) are rejected whatever they are: skip them.
            if done + offset + 1 >= len(answer) or drafts[-1] != answer[done + offset]:
                break
            pending = torch.tensor([[drafts[-1]]])
        matched = 0
        while matched < len(drafts) and done + matched < len(answer) and drafts[matched] == answer[done + matched]:
            matched += 1
        step = min(matched + 1, len(answer) - done)
        # The cache holds sequence + drafts[:-1]; the accepted drafts stay, the rest is rolled back.
        keep = len(sequence) + min(matched, len(drafts) - 1, step)
        cache.crop(-(cache.get_seq_length() - keep))  # transformers 5: a negative count of tokens to drop
        sequence += answer[done : done + step]
        cached = keep
        done += step
        rounds += 1
    return done, rounds


def mean_accepted_length(model: torch.nn.Module, held_out: HeldOutSet, k: int, num_prompts: int | None = None) -> float:
    """Tokens per target pass over the held-out chat answers (first ``num_prompts``)."""
    tokens, rounds = 0, 0
    pairs = list(zip(held_out.chat_prompts, held_out.chat_answers, strict=True))[:num_prompts]
    for prompt, answer in pairs:
        if not answer:
            continue
        got_tokens, got_rounds = chain_rounds(model, prompt, answer, k)
        tokens += got_tokens
        rounds += got_rounds
    return tokens / max(1, rounds)
