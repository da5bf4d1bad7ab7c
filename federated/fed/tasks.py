"""What one device does in a round, on its own log only: gate training, its cost curve, drafter distillation.

* Gate: a few Adam steps (Kingma & Ba, arXiv:1412.6980) of the cloud-labelled BCE from the
  global gate (:func:`tandemspec.federated.gate.adam_steps`, the central trainer's optimiser);
  the standardiser stays the global one.
* Cost curve (FedHLM's threshold objective): per threshold of a fixed grid, the tokens the
  gate would trust although the target rejects them (*missed*) and the tokens it would send
  for checking (*checks*), as smoothed-step sums (a sigmoid of (p - t) / τ instead of the
  step, so the curve is continuous in t); the server adds them up and minimises
  missed + λ·checks, globally and per cluster.
* Fresh features (``refresh_features``): the log's gate features were computed by the
  drafter the device ran when it logged (round 0's); once distillation has moved the
  drafter, the edge feeds the gate features of the new drafter. With the option on, a
  device recomputes every logged token's features with the drafter the gate will ship
  with (its logits and last hidden state on the logged context and drafted ids; the block
  position as logged) before training the gate and before its cost curve; the labels stay
  (the target's verdicts do not depend on the drafter).
* Drafter: DistillSpec (arXiv:2310.08461) on-policy distillation: the logged drafts are the
  drafter's own, and the log holds the target's top-k at each drafted position; the loss is
  the forward KL from the target's top-k (renormalised) to the drafter, on full weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandemspec.edge.devicelog import DeviceLog
from tandemspec.federated.gate import GateModel, adam_steps, forward, read_log

# Thresholds on p(accept) where each device reports its cost curve (the server's grid too).
THRESHOLD_GRID: tuple[float, ...] = tuple(float(t) for t in np.round(np.linspace(0.0, 1.0, 51), 4))


@dataclass(frozen=True)
class LocalTrainConfig:
    """How much a device trains per round."""

    gate_steps: int = 100
    gate_lr: float = 3e-3
    gate_batch: int = 512
    gate_weight_decay: float = 1e-2
    distill_steps: int = 12
    distill_batch: int = 8
    distill_lr: float = 3e-4
    curve_temperature: float = 0.02  # τ of the smoothed step
    refresh_features: bool = False  # gate features recomputed with the drafter the gate ships with
    threads: int = 1
    seed: int = 0


@dataclass(frozen=True)
class DistillExample:
    """One logged round: the ids before it, the drafted ids, and the target's top-k at each."""

    context_ids: tuple[int, ...]
    draft_ids: tuple[int, ...]
    top_ids: np.ndarray  # [n, k] int64
    top_probs: np.ndarray  # [n, k] float32, renormalised over the top-k


@dataclass(frozen=True)
class LocalData:
    """A device's own log, read once per message."""

    features: np.ndarray  # [n, dim] float32
    labels: np.ndarray  # [n] bool
    examples: tuple[DistillExample, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.labels)


def read_local(log_path: Path) -> LocalData:
    """Gate rows and distillation examples of one device log."""
    features, labels, _ = read_log(log_path)
    examples: list[DistillExample] = []
    with DeviceLog(log_path) as log:
        for record in log.iter_rounds():
            if record.context_ids is None or len(record.context_ids) < record.position:
                continue
            scored = [t for t in record.tokens if t.target_top_k is not None]
            if not scored or len(scored) != len(record.tokens):
                continue
            width = min(len(t.target_top_k.ids) for t in scored if t.target_top_k is not None)
            ids = np.array([t.target_top_k.ids[:width] for t in scored if t.target_top_k], np.int64)
            probs = np.array([t.target_top_k.probs[:width] for t in scored if t.target_top_k], np.float32)
            probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
            examples.append(
                DistillExample(
                    context_ids=tuple(record.context_ids[: record.position]),
                    draft_ids=tuple(t.token_id for t in record.tokens),
                    top_ids=ids,
                    top_probs=probs,
                )
            )
    return LocalData(features=features, labels=labels, examples=tuple(examples))


def load_drafter(drafter_config_dir: Path, state: Mapping[str, np.ndarray]) -> Any:
    """A torch drafter of the pair's architecture with ``state`` loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(drafter_config_dir))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    return model


def refresh_features(
    log_path: Path, drafter_config_dir: Path, state: Mapping[str, np.ndarray], data: LocalData, threads: int = 1
) -> LocalData:
    """``data`` with every logged token's gate features recomputed by the drafter ``state`` (rows with context)."""
    import torch

    from tandemspec.edge.features import SCALAR_FEATURES, token_features

    torch.set_num_threads(threads)
    model = load_drafter(drafter_config_dir, state).eval()
    features: list[np.ndarray] = []
    labels: list[bool] = []
    with DeviceLog(log_path) as log, torch.no_grad():
        for record in log.iter_rounds():
            if record.context_ids is None or len(record.context_ids) < record.position or not record.tokens:
                continue
            context = list(record.context_ids[: record.position])
            ids = context + [t.token_id for t in record.tokens]
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            at = torch.arange(len(context) - 1, len(ids) - 1)  # the logits at i predict token i + 1
            position = SCALAR_FEATURES.index("position")
            positions = np.array([t.features[position] for t in record.tokens], np.float32)  # as logged
            features.append(token_features(out.logits[0, at].numpy(), out.hidden_states[-1][0, at].numpy(), positions))
            labels += [t.label for t in record.tokens]
    if not features:
        return dataclasses.replace(data, features=data.features[:0], labels=data.labels[:0])
    return dataclasses.replace(data, features=np.concatenate(features), labels=np.array(labels, bool))


# ---------------------------------------------------------------- gate


def train_gate_local(gate: GateModel, data: LocalData, config: LocalTrainConfig) -> tuple[GateModel, float, float]:
    """Adam steps from the global gate on the device's labelled tokens: (gate, loss before, loss after)."""
    from tandemspec.federated.gate import log_loss

    x = ((data.features - gate.mean) / gate.std).astype(np.float64)  # [n, dim], the global standardiser
    y = data.labels.astype(np.float64)
    params = [a.astype(np.float64) for layer in gate.layers for a in layer]
    rng = np.random.default_rng(config.seed)
    before = log_loss(forward(gate, data.features), data.labels)
    adam_steps(params, x, y, config.gate_steps, config.gate_batch, config.gate_lr, config.gate_weight_decay, rng)
    layers = tuple((params[i].astype(np.float32), params[i + 1].astype(np.float32)) for i in range(0, len(params), 2))
    trained = GateModel(kind=gate.kind, mean=gate.mean, std=gate.std, layers=layers)
    return trained, before, log_loss(forward(trained, data.features), data.labels)


@dataclass(frozen=True)
class CostCurve:
    """Smoothed counts per threshold of :data:`THRESHOLD_GRID` (sums, so devices' curves add up)."""

    missed: np.ndarray  # [t] tokens trusted although rejected
    checks: np.ndarray  # [t] tokens doubted (sent for checking)
    num_rejected: float
    num_tokens: float

    def __add__(self, other: CostCurve) -> CostCurve:
        return CostCurve(
            self.missed + other.missed,
            self.checks + other.checks,
            self.num_rejected + other.num_rejected,
            self.num_tokens + other.num_tokens,
        )


def cost_curve(p_accept: np.ndarray, labels: np.ndarray, temperature: float) -> CostCurve:
    """FedHLM's per-threshold costs with a sigmoid-smoothed trust step: trust(t) = σ((p - t) / τ)."""
    grid = np.asarray(THRESHOLD_GRID)[:, None]  # [t, 1]
    p = np.asarray(p_accept, np.float64)[None, :]  # [1, n]
    trust = 0.5 * (1.0 + np.tanh(0.5 * (p - grid) / temperature))  # [t, n]
    rejected = ~np.asarray(labels, bool)
    return CostCurve(
        missed=(trust * rejected).sum(axis=1),
        checks=(1.0 - trust).sum(axis=1),
        num_rejected=float(rejected.sum()),
        num_tokens=float(p.size),
    )


def best_threshold(curve: CostCurve, weight: float) -> float:
    """The grid threshold minimising missed + λ·checks (per token); ties go to the more trusting one."""
    cost = (curve.missed + weight * curve.checks) / max(curve.num_tokens, 1.0)
    best = np.flatnonzero(cost <= cost.min() + 1e-12)
    return float(THRESHOLD_GRID[int(best[0])])


def threshold_for_catch(curve: CostCurve, quality: float) -> float:
    """The most trusting grid threshold whose smoothed share of rejections caught is at least ``quality``."""
    caught = 1.0 - curve.missed / max(curve.num_rejected, 1.0)
    meeting = np.flatnonzero(caught >= quality)
    return float(THRESHOLD_GRID[int(meeting[0])]) if meeting.size else 1.0


# ---------------------------------------------------------------- drafter


def distill_local(
    drafter_config_dir: Path, state: Mapping[str, np.ndarray], data: LocalData, config: LocalTrainConfig
) -> tuple[dict[str, np.ndarray], float, float]:
    """Forward-KL distillation of the global drafter on the device's examples: (state, loss first, loss last)."""
    import torch

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = load_drafter(drafter_config_dir, state)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.distill_lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    losses: list[float] = []
    for _ in range(config.distill_steps if data.examples else 0):
        rows = rng.choice(len(data.examples), min(config.distill_batch, len(data.examples)), replace=False)
        loss = distill_batch_loss(model, [data.examples[i] for i in rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
    # The keys that came in (a tied head is not a key of its own in the global model).
    trained = model.state_dict()
    out = {k: trained[k].detach().numpy().astype(np.float32) for k in state}
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    return out, first, last


def distill_batch_loss(model: Any, examples: Sequence[DistillExample]) -> Any:
    """Mean over drafted positions of KL(p_target-top-k || q_drafter), right-padded batch."""
    import torch
    import torch.nn.functional as F

    lengths = [len(e.context_ids) + len(e.draft_ids) for e in examples]
    width = max(lengths)
    ids = torch.zeros(len(examples), width, dtype=torch.long)  # [b, width]
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.context_ids + e.draft_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits  # [b, width, vocab]
    log_q = F.log_softmax(logits, dim=-1)
    total = torch.zeros(())
    count = 0
    for row, e in enumerate(examples):
        # The logits at position i predict token i + 1: draft j is predicted at len(context) - 1 + j.
        start = len(e.context_ids) - 1
        positions = torch.arange(start, start + len(e.draft_ids))
        p = torch.from_numpy(e.top_probs)  # [n, k]
        q = log_q[row, positions].gather(-1, torch.from_numpy(e.top_ids))  # [n, k]
        total = total + (p * (torch.log(p.clamp_min(1e-12)) - q)).sum()
        count += len(e.draft_ids)
    return total / max(count, 1)
