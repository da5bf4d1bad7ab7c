"""Judging one draft frame from the target's logits (pure numpy; no torch, no I/O).

The target is fed ``[pending, committed..., draft...]`` where *pending* is the session's
last token, not yet fed (the previous correction or bonus, or the prompt's last token).
Logits row ``j`` predicts input token ``j + 1``, so for ``m`` committed and ``k`` draft
tokens::

    rows 0 .. m-1      judge the committed tokens (labels only; never replaced)
    rows m .. m+k-1    judge the draft tokens (verify_greedy / verify_sampling)
    row  m+k           gives the bonus after a fully accepted block

Labels (the SPRINTER label, "would standard verification accept this token?"):

* draft tokens: what :func:`verify_greedy` / :func:`verify_sampling` return;
* committed tokens: the frame carries no q for them, so in both modes the label is
  "the token is the target's argmax" (greedy acceptance; deterministic, costs no draws).

``target_top_k`` (when the handshake asked for it): per labelled position, the
distribution the session samples from (``process_logits``) truncated with
:func:`truncate`. Greedy sessions get the untempered softmax instead, since their
processed distribution is a one-hot that would teach a drafter nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandemspec.sampling import (
    Judgement,
    process_logits,
    sample_dense,
    seeded_rng,
    softmax,
    truncate,
    verify_greedy,
    verify_sampling,
)
from tandemspec.types import DraftFrame, SamplingParams, SparseDist


@dataclass(frozen=True)
class FrameOutcome:
    """What verification decided for one frame."""

    num_committed: int
    num_accepted: int
    next_token: int | None  # correction or bonus; None when the bonus is deferred
    labels: tuple[bool, ...]  # committed tokens first, then draft tokens
    target_top_k: tuple[SparseDist, ...]

    @property
    def fully_accepted(self) -> bool:
        """Every draft token was accepted."""
        return self.num_accepted == len(self.labels) - self.num_committed


def judge_frame(logits: np.ndarray, frame: DraftFrame, sampling: SamplingParams, return_top_k: int) -> FrameOutcome:
    """Verify ``frame`` given the target's ``logits``: [1 + m + k, vocab] (see module doc)."""
    m, k = len(frame.committed_ids), len(frame.draft_ids)
    assert logits.shape[0] == 1 + m + k, (logits.shape, m, k)
    committed_labels = label_committed(logits[:m], frame.committed_ids)
    judgement = judge_draft(logits[m:], frame, sampling)
    top_k = target_top_k(logits[: m + k], sampling, return_top_k)
    return FrameOutcome(
        num_committed=m,
        num_accepted=judgement.num_accepted,
        next_token=judgement.next_token,
        labels=committed_labels + judgement.labels,
        target_top_k=top_k,
    )


def label_committed(logits: np.ndarray, committed_ids: tuple[int, ...]) -> tuple[bool, ...]:
    """Committed-token labels: is each token the target's argmax? ``logits``: [m, vocab]."""
    if not committed_ids:
        return ()
    argmax = np.argmax(logits, axis=-1)  # [m]
    return tuple(bool(argmax[i] == token) for i, token in enumerate(committed_ids))


def judge_draft(logits: np.ndarray, frame: DraftFrame, sampling: SamplingParams) -> Judgement:
    """Greedy or rejection-sampling verification of the draft tokens. ``logits``: [k + 1, vocab]."""
    defer = frame.expects_continuation
    if sampling.is_greedy:
        return verify_greedy(np.argmax(logits, axis=-1), frame.draft_ids, defer_bonus=defer)
    target_probs = process_logits(logits, sampling)  # [k + 1, vocab]
    first_draft_position = frame.position + len(frame.committed_ids)
    rng = seeded_rng(sampling.seed, first_draft_position)
    return verify_sampling(target_probs, frame.draft_ids, frame.draft_dists, rng, defer_bonus=defer)


def target_top_k(logits: np.ndarray, sampling: SamplingParams, top_k: int) -> tuple[SparseDist, ...]:
    """Per row of ``logits`` ([n, vocab]): the target's distribution truncated to ``top_k`` ids."""
    if top_k <= 0 or logits.shape[0] == 0:
        return ()
    probs = softmax(logits) if sampling.is_greedy else process_logits(logits, sampling)  # [n, vocab]
    return tuple(truncate(row, top_k) for row in probs)


def generate_token(logits: np.ndarray, sampling: SamplingParams, position: int) -> int:
    """The target's own choice for ``position`` (cloud-only mode). ``logits``: [vocab]."""
    if sampling.is_greedy:
        return int(np.argmax(logits))
    probs = process_logits(logits[None], sampling)[0]  # [vocab]
    return sample_dense(probs, seeded_rng(sampling.seed, position))
