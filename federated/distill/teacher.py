"""The target's side of distillation: loading it, scoring sequences, and drafting with a KV cache.

Scoring keeps only the target's top-k log-probabilities per position (DistillSpec
arXiv:2310.08461 trains on the teacher's distribution; its top-k holds nearly all of the
mass of a chat model), so a scored chunk is small enough to cache and replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel


def load_target(target_dir: Path) -> PreTrainedModel:
    """The target in float32 on the CPU, eval mode (its config may say bf16: near-ties would flip)."""
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    return model.eval()


@dataclass(frozen=True)
class ScoredChunk:
    """Token rows with the target's top-k next-token log-probabilities at every position."""

    input_ids: torch.Tensor  # [rows, length] int64 (right-padded)
    loss_mask: torch.Tensor  # [rows, length - 1] bool: position t predicts token t + 1 and counts
    topk_ids: torch.Tensor  # [rows, length - 1, k] int64, target vocabulary
    topk_logp: torch.Tensor  # [rows, length - 1, k] float32, log p of those ids (unnormalised top-k)

    def to_storage(self) -> dict[str, torch.Tensor]:
        """Compact tensors for ``torch.save`` (int32 ids, fp16 log-probs)."""
        return {
            "input_ids": self.input_ids.to(torch.int32),
            "loss_mask": self.loss_mask,
            "topk_ids": self.topk_ids.to(torch.int32),
            "topk_logp": self.topk_logp.to(torch.float16),
        }

    @classmethod
    def from_storage(cls, data: dict[str, torch.Tensor]) -> ScoredChunk:
        return cls(
            input_ids=data["input_ids"].long(),
            loss_mask=data["loss_mask"].bool(),
            topk_ids=data["topk_ids"].long(),
            topk_logp=data["topk_logp"].float(),
        )


@torch.no_grad()
def score(target: torch.nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor, k: int) -> ScoredChunk:
    """The target's top-k next-token log-probabilities over right-padded rows [rows, length]."""
    logits = target(input_ids=input_ids[:, :-1]).logits.float()  # [rows, length-1, vocab]
    logp = F.log_softmax(logits, dim=-1)
    top = logp.topk(k, dim=-1)
    return ScoredChunk(input_ids=input_ids, loss_mask=loss_mask, topk_ids=top.indices, topk_logp=top.values)


@torch.no_grad()
def target_argmax(target: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The target's greedy next token at every position of [rows, length]: [rows, length]."""
    return target(input_ids=input_ids).logits.argmax(-1)


@torch.no_grad()
def generate_rows(
    target: PreTrainedModel,
    prompts: list[list[int]],
    new_tokens: int,
    temperature: float,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> list[list[int]]:
    """Continuations by the target (batched, left-padded); each stops after an eos id."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    out = target.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=temperature > 0,
        pad_token_id=pad_id,
        eos_token_id=list(eos_ids),
        **sampling,
    )  # [rows, width + new]
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:end])
    return rows


@torch.no_grad()
def sample_with_cache(
    model: torch.nn.Module,
    prompt: list[int],
    new_tokens: int,
    temperature: float,
    eos_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    """One row's continuation with a KV cache (greedy at temperature 0); stops after an eos id."""
    cache = DynamicCache(config=model.config)
    pending = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(new_tokens):
        logits = model(input_ids=pending, past_key_values=cache, use_cache=True).logits[0, -1]  # [vocab]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        out.append(token)
        if token in eos_ids:
            break
        pending = torch.tensor([[token]])
    return out
