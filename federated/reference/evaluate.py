"""Figures of the reference pair's model card, measured on the held-out ``email/`` split.

Held-out loss and perplexity of each model; greedy next-token agreement of drafter and
target; mean accepted length of chain greedy speculative decoding at several draft
lengths (tokens per target pass, bonus included), before and after distillation.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from tandemspec.federated.reference.corpus import read_texts, split_corpus
from tandemspec.federated.reference.train import TokenStream, encode_documents

WINDOW = 256
DRAFT_LENGTHS = (2, 4, 6)
SAMPLE_PROMPTS = ("import os\n", "def ", "class ")


@dataclass(frozen=True)
class DrafterFigures:
    """How well one drafter serves the target."""

    held_out_loss: float
    held_out_perplexity: float
    greedy_agreement: float
    mean_accepted_length: dict[int, float]  # draft length -> tokens per target pass


@dataclass(frozen=True)
class PairFigures:
    """Everything the model card reports."""

    target_parameters: int
    drafter_parameters: int
    target_held_out_loss: float
    target_held_out_perplexity: float
    validation_tokens: int
    drafters: dict[str, DrafterFigures]  # "before distillation" / "after distillation"
    samples: list[str]
    speculation_prompts: int
    speculation_new_tokens: int
    seconds: float
    machine: str


def load_model(path: Path) -> PreTrainedModel:
    """A model of the pair in float32, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def validation_stream(tokenizer_json: Path) -> TokenStream:
    """The held-out split encoded with the pair's tokenizer."""
    split = split_corpus()
    return TokenStream(encode_documents(tokenizer_json, read_texts(split.validation)))


@torch.no_grad()
def loss_and_argmax(model: PreTrainedModel, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over the windows and the argmax at every position: [n, WINDOW-1]."""
    total, count, tops = 0.0, 0, []
    for batch in windows.split(16):
        logits = model(input_ids=batch[:, :-1]).logits  # [b, WINDOW-1, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
        tops.append(logits.argmax(-1))
    return total / count, torch.cat(tops)


@torch.no_grad()
def greedy_continuation(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """The model's greedy continuation of a [1, n] prompt (no early stop)."""
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, prompt.shape[1] :]]


@torch.no_grad()
def mean_accepted_length(
    drafter: PreTrainedModel, prompts: list[torch.Tensor], targets: list[list[int]], draft_length: int
) -> float:
    """Tokens per target pass of chain greedy speculative decoding (bonus included).

    Greedy speculative decoding emits exactly the target's greedy continuation, so each
    round is simulated against it: the drafter proposes ``draft_length`` tokens from the
    current context, the longest matching prefix is accepted, and the target adds one
    token (the correction, or the bonus after a full match).
    """
    tokens, rounds = 0, 0
    for prompt, target in zip(prompts, targets, strict=True):
        done = 0
        while done < len(target):
            context = torch.tensor([prompt.tolist()[0] + target[:done]])
            draft = greedy_continuation(drafter, context, draft_length)
            matched = 0
            while matched < draft_length and done + matched < len(target) and draft[matched] == target[done + matched]:
                matched += 1
            step = min(matched + 1, len(target) - done)
            done += step
            tokens += step
            rounds += 1
    return tokens / rounds


@torch.no_grad()
def samples_from(model: PreTrainedModel, tokenizer_json: Path, new_tokens: int = 80) -> list[str]:
    """Short sampled continuations of a few code openings (temperature 0.8, top-p 0.95, seeded)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    texts = []
    for index, opening in enumerate(SAMPLE_PROMPTS):
        torch.manual_seed(index)
        ids = torch.tensor([tokenizer.encode(opening).ids])  # the tokenizer adds the bos
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            top_k=0,
            max_new_tokens=new_tokens,
            pad_token_id=0,
            eos_token_id=2,
        )
        texts.append(tokenizer.decode([int(t) for t in out[0, 1:]], skip_special_tokens=True))
    return texts


def evaluate_pair(
    pair_dir: Path,
    base_drafter_dir: Path | None,
    num_prompts: int = 24,
    prompt_tokens: int = 64,
    new_tokens: int = 96,
) -> PairFigures:
    """Measure the pair in ``pair_dir`` (and optionally the undistilled drafter)."""
    started = time.perf_counter()
    tokenizer_json = pair_dir / "target" / "tokenizer.json"
    target = load_model(pair_dir / "target")
    drafters = {"after distillation": load_model(pair_dir / "drafter")}
    if base_drafter_dir is not None:
        drafters = {"before distillation": load_model(base_drafter_dir), **drafters}
    stream = validation_stream(tokenizer_json)
    windows = stream.consecutive_windows(len(stream.ids) // WINDOW, WINDOW)
    target_loss, target_top = loss_and_argmax(target, windows)

    # Speculation prompts: evenly spaced prefixes of the held-out stream.
    spacing = len(stream.ids) // num_prompts
    prompts = [
        torch.from_numpy(stream.ids[i * spacing : i * spacing + prompt_tokens].astype(np.int64))[None]
        for i in range(num_prompts)
    ]
    target_greedy = [greedy_continuation(target, p, new_tokens) for p in prompts]

    figures: dict[str, DrafterFigures] = {}
    for name, drafter in drafters.items():
        loss, top = loss_and_argmax(drafter, windows)
        figures[name] = DrafterFigures(
            held_out_loss=loss,
            held_out_perplexity=math.exp(loss),
            greedy_agreement=float((top == target_top).float().mean()),
            mean_accepted_length={k: mean_accepted_length(drafter, prompts, target_greedy, k) for k in DRAFT_LENGTHS},
        )
    return PairFigures(
        target_parameters=target.num_parameters(),
        drafter_parameters=drafters["after distillation"].num_parameters(),
        target_held_out_loss=target_loss,
        target_held_out_perplexity=math.exp(target_loss),
        validation_tokens=int(windows.numel()),
        drafters=figures,
        samples=samples_from(target, tokenizer_json),
        speculation_prompts=num_prompts,
        speculation_new_tokens=new_tokens,
        seconds=time.perf_counter() - started,
        machine=" ".join(
            part for part in (platform.machine(), platform.processor(), f"torch {torch.__version__}") if part
        )
        + f" threads {torch.get_num_threads()}",
    )


def write_figures(figures: PairFigures, path: Path) -> None:
    """Save the figures as JSON."""
    path.write_text(json.dumps(asdict(figures), indent=2) + "\n")
