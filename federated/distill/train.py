"""DistillSpec training of a reduced-head drafter against a Hugging Face target, resumable.

DistillSpec (arXiv:2310.08461): the drafter is trained on the target's distribution over
data that resembles what it will draft: here, per step, one fresh *chunk* of rows scored
by the target, from a cycling mix of sources —

- ``corpus``: windows of held-in training text (docs, docstrings, ``--corpus`` files);
- ``target``: the target's own answers to chat prompts (greedy, or sampled at 0.8);
- ``onpolicy``: the drafter's own samples (temperature 1) after chat prompts —

plus ``replay_chunks`` earlier chunks from the on-disk cache (the target's top-k costs
~4 ms per token on one core; replaying it costs only the drafter's step). The loss is
forward KL or total variation between the target's top-k (renormalised over the ids the
draft head holds) and the drafter's head.

Resuming: a chunk and a replay choice are pure functions of (seed, step), and the
checkpoint holds model, optimiser, step and the elapsed training time, so a restart with the
same command continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tandemspec.federated.distill.data import build_text, draft_vocabulary
from tandemspec.federated.distill.evaluate import HeldOutSet, greedy_agreement, mean_accepted_length
from tandemspec.federated.distill.model import DraftHeadModel, draft_head_from_target, save_drafter
from tandemspec.federated.distill.teacher import (
    ScoredChunk,
    generate_rows,
    load_target,
    sample_with_cache,
    score,
    target_argmax,
)

logger = logging.getLogger(__name__)

Objective = Literal["fkl", "tvd"]
Source = Literal["corpus", "target", "onpolicy"]
SOURCES: tuple[Source, ...] = ("corpus", "target", "onpolicy")
CHECKPOINT_NAME = "checkpoint.pt"
EVAL_LOG_NAME = "eval.jsonl"


@dataclass(frozen=True)
class DrafterShape:
    """The drafter's size: layers taken from the target and the draft head's vocabulary."""

    num_layers: int
    draft_vocab_size: int


def default_shape(target_config: Any) -> DrafterShape:
    """A drafter of about 1/8 of the target's depth; a reduced head once the vocabulary is large.

    Measured on SmolLM2-135M (30 layers, vocab 49152) in ONNX Runtime on 2 cores: its full
    head costs ~10 ms per token, 4 of its layers ~2 ms and an 8192-token head ~1.7 ms.
    """
    layers = max(1, round(int(target_config.num_hidden_layers) / 8))
    vocab = int(target_config.vocab_size)
    return DrafterShape(num_layers=layers, draft_vocab_size=vocab if vocab <= 16384 else 8192)


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (stored in the work folder)."""

    target_dir: Path
    work_dir: Path
    out_dir: Path
    shape: DrafterShape
    corpus_files: tuple[Path, ...] = ()
    doc_root: Path | None = None  # default: /usr/share/doc/python3.*/html when present
    seed: int = 0
    threads: int = 1
    objective: Objective = "fkl"
    top_k: int = 32
    seq_len: int = 256
    rows_per_chunk: int = 4
    replay_chunks: int = 3
    mix: tuple[Source, ...] = ("target", "corpus", "onpolicy", "corpus")
    answer_tokens: int = 160
    target_temperatures: tuple[float, ...] = (0.0, 0.8)  # alternate greedy and sampled target answers
    onpolicy_temperature: float = 1.0
    lr: float = 3e-4
    warmup_steps: int = 50
    max_steps: int | None = None
    max_minutes: float | None = None
    checkpoint_every_s: float = 300.0
    eval_every_steps: int = 200
    eval_prompts: int = 24
    eval_answer_tokens: int = 96
    eval_windows: int = 8
    eval_accept_prompts: int = 8  # periodic evals simulate k=4 on this many prompts (the report on all)
    log_every_steps: int = 10
    vocab_steps: int = 64  # the target-answer chunks among the first steps choose the draft vocabulary
    committed_dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, config: DistillConfig) -> float:
    """Linear warm-up, then constant (the run is open-ended and resumed across sessions)."""
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def distill_loss(
    head_logits: torch.Tensor,
    topk_draft: torch.Tensor,
    topk_logp: torch.Tensor,
    mask: torch.Tensor,
    objective: Objective,
) -> torch.Tensor:
    """Mean divergence from the target's top-k (restricted to the head) to the drafter's head.

    head_logits [rows, seq, draft_vocab]; topk_draft [rows, seq, k] draft-head indices, -1 where
    the target's id is outside the head; topk_logp [rows, seq, k]; mask [rows, seq] bool.
    """
    inside = topk_draft >= 0
    p = torch.where(inside, topk_logp.exp(), torch.zeros_like(topk_logp))
    mass = p.sum(-1, keepdim=True)
    valid = mask & (mass.squeeze(-1) > 0)
    p = p / mass.clamp_min(1e-9)  # [rows, seq, k] target's top-k renormalised over the head
    log_q = F.log_softmax(head_logits, dim=-1)
    log_q_k = log_q.gather(-1, topk_draft.clamp_min(0))  # [rows, seq, k]
    if objective == "fkl":
        per_position = (p * (torch.log(p.clamp_min(1e-12)) - log_q_k)).sum(-1)  # KL(p || q)
    else:
        q_k = torch.where(inside, log_q_k.exp(), torch.zeros_like(log_q_k))
        per_position = 0.5 * ((p - q_k).abs().sum(-1) + 1.0 - q_k.sum(-1))  # TV(p, q), q outside top-k
    return (per_position * valid).sum() / valid.sum().clamp_min(1)


class Distiller:
    """One distillation run against one work folder: setup, resumable training, publishing."""

    def __init__(self, config: DistillConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        torch.set_num_threads(config.threads)
        self.work = config.work_dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.chunk_dir = self.work / "chunks"
        self.chunk_dir.mkdir(exist_ok=True)
        self.target = load_target(config.target_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(config.target_dir)
        generation = self.target.generation_config
        eos = generation.eos_token_id if generation is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self._stop = False

    # ----- setup (cached in the work folder) -----

    def _render(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def setup(self) -> None:
        """Text, token streams, prompts, draft vocabulary and the held-out set, each built once."""
        data_path = self.work / "data.pt"
        if data_path.exists():
            data = torch.load(data_path, weights_only=False)
        else:
            started = time.perf_counter()
            text = build_text(self.config.seed, self.config.corpus_files, self.config.doc_root)
            logger.info(
                "text: %d train passages, %d held-out, %d train prompts, %d held-out prompts",
                len(text.corpus_train),
                len(text.corpus_held_out),
                len(text.prompts_train),
                len(text.prompts_held_out),
            )
            eos = self.eos_ids[0]
            encoded = self.tokenizer(list(text.corpus_train), add_special_tokens=False)["input_ids"]
            train_stream = np.concatenate([np.asarray([*ids, eos], dtype=np.int32) for ids in encoded])
            held = self.tokenizer(list(text.corpus_held_out), add_special_tokens=False)["input_ids"]
            held_stream = np.concatenate([np.asarray([*ids, eos], dtype=np.int32) for ids in held])
            prompts_train = [self._render(p) for p in text.prompts_train]
            prompts_held = [self._render(p) for p in text.prompts_held_out]
            data = {
                "train_stream": train_stream,
                "held_stream": held_stream,
                "prompts_train": prompts_train,
                "prompts_held": prompts_held,
            }
            torch.save(data, data_path)
            logger.info(
                "tokens: %d train, %d held-out (%.0f s)",
                len(train_stream),
                len(held_stream),
                time.perf_counter() - started,
            )
        self.train_stream: np.ndarray = data["train_stream"]
        self.prompts_train: list[list[int]] = data["prompts_train"]
        self.held_out = self._held_out(data)
        self.draft_ids = torch.tensor(self._draft_vocabulary(data), dtype=torch.int64)
        vocab = int(self.target.config.vocab_size)
        self.full_to_draft = torch.full((vocab,), -1, dtype=torch.int64)
        self.full_to_draft[self.draft_ids] = torch.arange(len(self.draft_ids))

    def _draft_vocabulary(self, data: dict[str, Any]) -> list[int]:
        """The draft head's ids: what the target itself predicts first, then the corpus's most frequent.

        The target's top-1 over the chunks of the first ``vocab_steps`` training steps whose source
        is ``target`` (its own chat answers, made here and reused by training) ranks first, as
        EAGLE-3 draws its draft vocabulary from target-generated data; corpus frequency fills the
        rest. Built once (``draft_vocab.json``).
        """
        path = self.work / "draft_vocab.json"
        if path.exists():
            return [int(i) for i in json.loads(path.read_text())]
        started = time.perf_counter()
        config = self.config
        predicted: list[list[int]] = []
        for step in range(config.vocab_steps):
            if config.mix[step % len(config.mix)] == "target":
                chunk = self.chunk(step, None)
                predicted.append(chunk.topk_ids[..., 0][chunk.loss_mask].tolist())
        vocab = int(self.target.config.vocab_size)
        special = sorted(set(self.tokenizer.all_special_ids) | set(self.eos_ids))
        corpus = [data["train_stream"].tolist(), *data["prompts_train"]]
        ids = draft_vocabulary(predicted, corpus, config.shape.draft_vocab_size, vocab, special)
        path.write_text(json.dumps(ids) + "\n")
        held_answers = [t for answer in self.held_out.chat_answers for t in answer]
        chosen = set(ids)
        coverage = sum(t in chosen for t in held_answers) / max(1, len(held_answers))
        logger.info(
            "draft vocabulary: %d ids from %d target-predicted tokens; covers %.3f of held-out answer tokens (%.0f s)",
            len(ids),
            sum(len(p) for p in predicted),
            coverage,
            time.perf_counter() - started,
        )
        return ids

    def _held_out(self, data: dict[str, Any]) -> HeldOutSet:
        path = self.work / "held_out.pt"
        if path.exists():
            stored: dict[str, Any] = torch.load(path, weights_only=False)
            return HeldOutSet(**stored)
        started = time.perf_counter()
        prompts = [p[: self.config.seq_len // 2] for p in data["prompts_held"][: self.config.eval_prompts]]
        answers: list[list[int]] = []
        for start in range(0, len(prompts), 8):
            answers += generate_rows(
                self.target, prompts[start : start + 8], self.config.eval_answer_tokens, 0.0, self.eos_ids, self.pad_id
            )
        stream = data["held_stream"]
        length = self.config.seq_len
        count = min(self.config.eval_windows, len(stream) // length)
        spacing = len(stream) // max(1, count)
        windows = torch.from_numpy(np.stack([stream[i * spacing : i * spacing + length] for i in range(count)]))
        windows = windows.long()
        held: dict[str, Any] = {
            "chat_prompts": prompts,
            "chat_answers": answers,
            "corpus_windows": windows,
            "corpus_target_top": target_argmax(self.target, windows),
        }
        torch.save(held, path)
        logger.info(
            "held-out set: %d chat answers, %d windows (%.0f s)", len(answers), count, time.perf_counter() - started
        )
        return HeldOutSet(**held)

    def initial_drafter(self) -> DraftHeadModel:
        """The target's first layers, its embedding (frozen) and its output rows for the draft vocabulary."""
        return draft_head_from_target(self.target, self.config.shape.num_layers, self.draft_ids)

    # ----- data of one step -----

    def _rng(self, step: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, purpose, step])

    def _pad_rows(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.config.seq_len
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), length - 1), dtype=torch.bool)
        for index, row in enumerate(rows):
            row = row[:length]
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row) - 1] = True
        return ids, mask

    def _chat_prompts(self, step: int) -> list[list[int]]:
        picks = self._rng(step, 2).integers(0, len(self.prompts_train), self.config.rows_per_chunk)
        return [self.prompts_train[int(i)][: self.config.seq_len // 2] for i in picks]

    def make_chunk(self, step: int, drafter: DraftHeadModel | None) -> ScoredChunk:
        """The fresh chunk of ``step``: rows from its source, scored by the target."""
        config = self.config
        source = config.mix[step % len(config.mix)]
        if source == "corpus":
            starts = self._rng(step, 1).integers(0, len(self.train_stream) - config.seq_len, config.rows_per_chunk)
            rows = [self.train_stream[s : s + config.seq_len].tolist() for s in starts]
        elif source == "target":
            occurrence = step // len(config.mix)
            temperature = config.target_temperatures[occurrence % len(config.target_temperatures)]
            torch.manual_seed(config.seed * 1_000_003 + step)
            prompts = self._chat_prompts(step)
            answers = generate_rows(self.target, prompts, config.answer_tokens, temperature, self.eos_ids, self.pad_id)
            rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        else:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            assert drafter is not None, "on-policy chunks need the drafter"
            drafter.eval()
            prompts = self._chat_prompts(step)
            rows = [
                p
                + sample_with_cache(
                    drafter, p, config.answer_tokens, config.onpolicy_temperature, self.eos_ids, generator
                )
                for p in prompts
            ]
        ids, mask = self._pad_rows(rows)
        return score(self.target, ids, mask, config.top_k)

    def chunk(self, step: int, drafter: DraftHeadModel | None) -> ScoredChunk:
        """The cached chunk of ``step``, made and stored first if absent."""
        path = self.chunk_dir / f"{step:08d}.pt"
        if path.exists():
            return ScoredChunk.from_storage(torch.load(path, weights_only=True))
        made = self.make_chunk(step, drafter)
        torch.save(made.to_storage(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return made

    def batch(self, step: int, drafter: DraftHeadModel) -> ScoredChunk:
        """This step's fresh chunk plus ``replay_chunks`` earlier ones."""
        chunks = [self.chunk(step, drafter)]
        if step > 0:
            for earlier in self._rng(step, 3).integers(0, step, min(step, self.config.replay_chunks)):
                chunks.append(self.chunk(int(earlier), drafter))
        return ScoredChunk(
            input_ids=torch.cat([c.input_ids for c in chunks]),
            loss_mask=torch.cat([c.loss_mask for c in chunks]),
            topk_ids=torch.cat([c.topk_ids for c in chunks]),
            topk_logp=torch.cat([c.topk_logp for c in chunks]),
        )

    # ----- training -----

    def evaluate(self, drafter: torch.nn.Module, num_accept_prompts: int | None) -> dict[str, float]:
        """Held-out greedy agreement (chat answers, text) and k=4 accepted length."""
        drafter.eval()
        agreement = greedy_agreement(drafter, self.held_out)
        accepted = mean_accepted_length(drafter, self.held_out, 4, num_accept_prompts)
        return {"agreement_chat": agreement["chat"], "agreement_text": agreement["text"], "accepted_k4": accepted}

    def _request_stop(self, signum: int, frame: Any) -> None:
        logger.info("signal %d: checkpointing and stopping", signum)
        self._stop = True

    def train(self) -> DraftHeadModel:
        """Run (or resume) training until ``max_steps`` / ``max_minutes``; returns the drafter."""
        config = self.config
        self.setup()
        drafter = self.initial_drafter()
        trainable = [p for p in drafter.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        checkpoint = self.work / CHECKPOINT_NAME
        step, elapsed_s = 0, 0.0
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=False)
            drafter.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            step, elapsed_s = int(state["step"]), float(state["elapsed_s"])
            logger.info("resuming at step %d (%.1f min trained)", step, elapsed_s / 60)
        else:
            initial = self.evaluate(drafter, config.eval_accept_prompts)
            self._log_eval({"step": 0, "minutes": 0.0, "tokens": 0, **initial})
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        started, last_checkpoint = time.perf_counter(), time.perf_counter()
        base_elapsed = elapsed_s
        tokens = int(state["tokens"]) if checkpoint.exists() else 0
        try:
            while not self._stop:
                elapsed_s = base_elapsed + time.perf_counter() - started
                if config.max_steps is not None and step >= config.max_steps:
                    break
                if config.max_minutes is not None and elapsed_s >= config.max_minutes * 60:
                    break
                batch = self.batch(step, drafter)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config)
                drafter.train()
                drafter.logits_mode = "draft"
                head = drafter(input_ids=batch.input_ids[:, :-1]).logits  # [rows, seq-1, draft_vocab]
                drafter.logits_mode = "full"
                topk_draft = self.full_to_draft[batch.topk_ids]
                loss = distill_loss(head, topk_draft, batch.topk_logp, batch.loss_mask, config.objective)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                step += 1
                tokens += int(batch.loss_mask.sum())
                if step % config.log_every_steps == 0:
                    with torch.no_grad():
                        top = self.full_to_draft[batch.topk_ids[..., 0]]
                        hit = ((head.argmax(-1) == top) & batch.loss_mask).sum() / batch.loss_mask.sum()
                    rate = tokens / max(1.0, base_elapsed + time.perf_counter() - started)
                    logger.info(
                        "step %d loss %.4f train-agreement %.3f (%.0f tok/s, %.1f min)",
                        step,
                        float(loss),
                        float(hit),
                        rate,
                        (base_elapsed + time.perf_counter() - started) / 60,
                    )
                if step % config.eval_every_steps == 0:
                    figures = self.evaluate(drafter, config.eval_accept_prompts)
                    minutes = (base_elapsed + time.perf_counter() - started) / 60
                    self._log_eval({"step": step, "minutes": minutes, "tokens": tokens, **figures})
                    self.publish(drafter)
                if time.perf_counter() - last_checkpoint > config.checkpoint_every_s:
                    self._checkpoint(drafter, optimizer, step, base_elapsed + time.perf_counter() - started, tokens)
                    last_checkpoint = time.perf_counter()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._checkpoint(drafter, optimizer, step, base_elapsed + time.perf_counter() - started, tokens)
        drafter.eval()
        self.publish(drafter)
        return drafter

    def _checkpoint(
        self, drafter: DraftHeadModel, optimizer: torch.optim.Optimizer, step: int, elapsed_s: float, tokens: int
    ) -> None:
        path = self.work / CHECKPOINT_NAME
        state = {
            "model": drafter.trainable_state(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "elapsed_s": elapsed_s,
            "tokens": tokens,
        }
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # atomic on POSIX
        logger.info("checkpoint at step %d", step)

    def _log_eval(self, record: dict[str, float]) -> None:
        logger.info("eval %s", json.dumps(record))
        with (self.work / EVAL_LOG_NAME).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def publish(self, drafter: DraftHeadModel) -> Path:
        """Write the drafter folder (all weights, its committed parts, tokenizer) to ``out_dir/drafter``."""
        out = self.config.out_dir / "drafter"
        save_drafter(drafter.eval(), out, self.config.target_dir, getattr(torch, self.config.committed_dtype))
        (self.config.out_dir / "distill_config.json").write_text(
            json.dumps(asdict(self.config), indent=2, default=str) + "\n"
        )
        return out

    def load_checkpoint_drafter(self) -> DraftHeadModel:
        """The drafter of the latest checkpoint (or the initial one)."""
        self.setup()
        drafter = self.initial_drafter()
        checkpoint = self.work / CHECKPOINT_NAME
        self.loaded_checkpoint: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "tokens": 0}
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=False)
            drafter.load_state_dict(state["model"], strict=False)
            self.loaded_checkpoint = {key: state[key] for key in self.loaded_checkpoint}
        return drafter.eval()


def mean_or_nan(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
