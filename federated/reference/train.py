"""Rebuild the reference pair: tokenizer, target, drafter, DistillSpec distillation.

Stages run in order and each is resumable: a stage that finished leaves a ``done`` marker
in the work folder and is skipped on the next run; a stage that was interrupted resumes
from its last checkpoint. Batches are a pure function of (seed, stage, step), so a resumed
run sees exactly the batches an uninterrupted one would.

Distillation follows DistillSpec (arXiv:2310.08461): the drafter is trained on its own
sampled continuations (on-policy), scored by the target, with either total-variation
distance or forward KL; both are run and the one with the higher greedy agreement on the
validation split is kept.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from tandemspec.federated.reference.corpus import read_texts, split_corpus
from tandemspec.federated.reference.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    save_tokenizer,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

DistillObjective = Literal["tvd", "fkl"]
CHECKPOINT_EVERY_STEPS = 50


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions of one model of the pair."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    def per_token_matmul_params(self, vocab_size: int) -> int:
        """Weights touched per token (blocks + LM head): a proxy for per-token compute."""
        attention = 4 * self.hidden_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp) + vocab_size * self.hidden_size


@dataclass(frozen=True)
class StageSchedule:
    """Optimiser schedule of one training stage."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int


@dataclass(frozen=True)
class TrainReferenceConfig:
    """Everything that determines the reference pair."""

    work_dir: Path
    out_dir: Path
    seed: int = 0
    threads: int = 2
    vocab_size: int = 8192
    seq_len: int = 256
    target: ModelShape = ModelShape(hidden_size=320, num_layers=6, num_heads=5, intermediate_size=864)
    drafter: ModelShape = ModelShape(hidden_size=160, num_layers=2, num_heads=5, intermediate_size=448)
    target_schedule: StageSchedule = StageSchedule(steps=1100, batch_size=16, lr=1.5e-3, warmup_steps=50)
    drafter_schedule: StageSchedule = StageSchedule(steps=700, batch_size=16, lr=2e-3, warmup_steps=30)
    distill_schedule: StageSchedule = StageSchedule(steps=350, batch_size=16, lr=5e-4, warmup_steps=10)
    distill_prefix_len: int = 64
    distill_new_tokens: int = 96
    objectives: tuple[DistillObjective, ...] = ("tvd", "fkl")
    agreement_windows: int = 48
    # The target is stored in bfloat16 to keep the committed pair small; the drafter in fp32.
    target_save_dtype: str = "bfloat16"


def build_model(shape: ModelShape, vocab_size: int, max_positions: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape with the reference tokenizer's ids."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


class TokenStream:
    """One long array of token ids (documents joined as bos ... eos) with windowed sampling."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def windows(self, rng: np.random.Generator, batch_size: int, length: int) -> torch.Tensor:
        """``batch_size`` random windows of ``length`` ids: [batch, length]."""
        starts = rng.integers(0, len(self.ids) - length, size=batch_size)
        rows = np.stack([self.ids[s : s + length] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)

    def consecutive_windows(self, count: int, length: int) -> torch.Tensor:
        """The first ``count`` non-overlapping windows (deterministic evaluation data)."""
        count = min(count, len(self.ids) // length)
        rows = self.ids[: count * length].reshape(count, length).astype(np.int64)
        return torch.from_numpy(rows)


def encode_documents(tokenizer_path: Path, texts: list[str]) -> np.ndarray:
    """Encode documents as one uint16 stream: bos, ids..., eos per document."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    pieces: list[np.ndarray] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray([bos, *encoding.ids, eos], dtype=np.uint16))
    return np.concatenate(pieces)


def lr_at(step: int, schedule: StageSchedule) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def run_stage(
    name: str,
    model: PreTrainedModel,
    schedule: StageSchedule,
    step_loss: Callable[[int], tuple[torch.Tensor, int]],
    stage_dir: Path,
    checkpoint_every: int = CHECKPOINT_EVERY_STEPS,
) -> None:
    """Optimise ``model`` for ``schedule.steps`` steps, checkpointing so it can resume.

    ``step_loss(step)`` returns the loss of that step's batch and its number of tokens.
    """
    from tqdm import tqdm

    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = stage_dir / "checkpoint.pt"
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start_step = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        logger.info("%s: resuming at step %d", name, start_step)
    model.train()
    progress = tqdm(total=schedule.steps, initial=start_step, desc=name, mininterval=10.0)
    tokens_seen, started = 0, time.perf_counter()
    for step in range(start_step, schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss, num_tokens = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += num_tokens
        rate = tokens_seen / (time.perf_counter() - started)
        progress.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}", refresh=False)
        progress.update(1)
        if (step + 1) % checkpoint_every == 0 or step + 1 == schedule.steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # atomic on POSIX
            logger.info("%s: step %d/%d loss %.4f (%.0f tok/s)", name, step + 1, schedule.steps, loss.item(), rate)
    progress.close()
    model.eval()


def lm_loss(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over a [batch, seq] window."""
    logits = model(input_ids=batch[:, :-1]).logits  # [batch, seq-1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: DistillObjective
) -> torch.Tensor:
    """Per-position divergence between teacher p and student q, averaged: [batch, seq, vocab] inputs."""
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    if objective == "fkl":
        divergence = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p || q)
    else:
        divergence = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # TV(p, q)
    return divergence.mean()


def greedy_agreement(drafter: PreTrainedModel, target: PreTrainedModel, windows: torch.Tensor) -> float:
    """Fraction of positions where drafter and target argmax agree on the given windows."""
    agree, total = 0, 0
    with torch.no_grad():
        for row in windows.split(8):
            drafter_top = drafter(input_ids=row).logits.argmax(-1)
            target_top = target(input_ids=row).logits.argmax(-1)
            agree += int((drafter_top == target_top).sum())
            total += drafter_top.numel()
    return agree / total


def _save_model(model: PreTrainedModel, out_dir: Path, tokenizer_dir: Path, dtype: torch.dtype) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)


def _load_final(stage_dir: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(stage_dir / "final", dtype=torch.float32)
    model.eval()
    return model


class ReferenceTrainer:
    """Runs the stages of ``train-reference`` against one work folder."""

    def __init__(self, config: TrainReferenceConfig) -> None:
        self.config = config
        self.work = config.work_dir
        self.tokenizer_dir = self.work / "tokenizer"
        torch.set_num_threads(config.threads)

    def run(self) -> None:
        """Every stage in order; finished stages are skipped."""
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "config.json").write_text(json.dumps(asdict(self.config), indent=2, default=str) + "\n")
        self.build_tokenizer()
        train, validation = self.encode()
        target = self.pretrain("target", self.config.target, self.config.target_schedule, train, stage_index=1)
        drafter_base = self.pretrain(
            "drafter-base", self.config.drafter, self.config.drafter_schedule, train, stage_index=2
        )
        del drafter_base
        windows = validation.consecutive_windows(self.config.agreement_windows, self.config.seq_len)
        scores: dict[str, float] = {}
        for index, objective in enumerate(self.config.objectives):
            drafter = self.distill(objective, target, train, stage_index=3 + index)
            scores[objective] = greedy_agreement(drafter, target, windows)
            logger.info("distill-%s: validation greedy agreement %.4f", objective, scores[objective])
        best = max(scores, key=lambda objective: scores[objective])
        self.publish(best, scores)

    def build_tokenizer(self) -> None:
        """Stage 0: the byte-level BPE, trained on the training split only."""
        if (self.tokenizer_dir / "tokenizer.json").exists():
            return
        split = split_corpus(seed=self.config.seed)
        tokenizer = train_tokenizer(read_texts(split.train), self.config.vocab_size)
        save_tokenizer(tokenizer, self.tokenizer_dir, model_max_length=1024)
        logger.info("tokenizer: %d tokens", tokenizer.get_vocab_size())

    def encode(self) -> tuple[TokenStream, TokenStream]:
        """Stage 0b: both splits as token streams (cached as .npy)."""
        data_dir = self.work / "data"
        paths = {name: data_dir / f"{name}.npy" for name in ("train", "validation")}
        if not all(path.exists() for path in paths.values()):
            data_dir.mkdir(parents=True, exist_ok=True)
            split = split_corpus(seed=self.config.seed)
            tokenizer_path = self.tokenizer_dir / "tokenizer.json"
            np.save(paths["train"], encode_documents(tokenizer_path, read_texts(split.train)))
            np.save(paths["validation"], encode_documents(tokenizer_path, read_texts(split.validation)))
        train, validation = (TokenStream(np.load(paths[name])) for name in ("train", "validation"))
        logger.info("corpus: %d train tokens, %d validation tokens", len(train.ids), len(validation.ids))
        return train, validation

    def pretrain(
        self, name: str, shape: ModelShape, schedule: StageSchedule, train: TokenStream, stage_index: int
    ) -> LlamaForCausalLM:
        """Next-token pretraining of one model on the training split."""
        stage_dir = self.work / name
        if (stage_dir / "done").exists():
            return _load_final(stage_dir)
        torch.manual_seed(self.config.seed + stage_index)
        model = build_model(shape, self.config.vocab_size, max_positions=1024)
        logger.info("%s: %.2fM parameters", name, model.num_parameters() / 1e6)

        def step_loss(step: int) -> tuple[torch.Tensor, int]:
            rng = np.random.default_rng([self.config.seed, stage_index, step])
            batch = train.windows(rng, schedule.batch_size, self.config.seq_len + 1)
            return lm_loss(model, batch), batch.numel()

        run_stage(name, model, schedule, step_loss, stage_dir)
        model.save_pretrained(stage_dir / "final", safe_serialization=True)
        (stage_dir / "done").touch()
        return model

    def distill(
        self, objective: DistillObjective, target: PreTrainedModel, train: TokenStream, stage_index: int
    ) -> LlamaForCausalLM:
        """On-policy distillation of the pretrained drafter toward the target."""
        name = f"distill-{objective}"
        stage_dir = self.work / name
        if (stage_dir / "done").exists():
            return _load_final(stage_dir)
        drafter = _load_final(self.work / "drafter-base")
        schedule = self.config.distill_schedule
        prefix_len, new_tokens = self.config.distill_prefix_len, self.config.distill_new_tokens
        target.eval()

        def step_loss(step: int) -> tuple[torch.Tensor, int]:
            rng = np.random.default_rng([self.config.seed, stage_index, step])
            prefix = train.windows(rng, schedule.batch_size, prefix_len)
            torch.manual_seed(self.config.seed * 1_000_003 + stage_index * 10_007 + step)
            drafter.eval()
            with torch.no_grad():
                # The drafter's own samples (on-policy); the prefix is real code.
                sequences = drafter.generate(
                    input_ids=prefix,
                    attention_mask=torch.ones_like(prefix),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                )  # [batch, prefix_len + new_tokens]
                teacher_logits = target(input_ids=sequences[:, :-1]).logits
            drafter.train()
            student_logits = drafter(input_ids=sequences[:, :-1]).logits
            return distill_loss(student_logits, teacher_logits, objective), sequences.numel()

        run_stage(name, drafter, schedule, step_loss, stage_dir)
        drafter.save_pretrained(stage_dir / "final", safe_serialization=True)
        (stage_dir / "done").touch()
        return drafter

    def publish(self, best: str, scores: dict[str, float]) -> None:
        """Write the chosen pair to ``out_dir`` in Hugging Face format."""
        out = self.config.out_dir
        target = _load_final(self.work / "target")
        drafter = _load_final(self.work / f"distill-{best}")
        _save_model(target, out / "target", self.tokenizer_dir, getattr(torch, self.config.target_save_dtype))
        _save_model(drafter, out / "drafter", self.tokenizer_dir, torch.float32)
        summary = {
            "chosen_objective": best,
            "validation_agreement_by_objective": scores,
            "config": asdict(self.config),
        }
        (out / "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        logger.info("published %s (distill-%s) to %s", "pair", best, out)
