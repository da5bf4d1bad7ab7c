"""Judging one draft frame from the target's logits, on the model's device (no I/O).

The target is fed ``[pending, committed..., draft...]`` where *pending* is the session's
last token, not yet fed (the previous correction or bonus, or the prompt's last token).
Logits row ``j`` predicts input token ``j + 1``, so for ``m`` committed and ``k`` draft
tokens::

    rows 0 .. m-1      judge the committed tokens (labels only; never replaced)
    rows m .. m+k-1    judge the draft tokens (verify_greedy / verify_sampling)
    row  m+k           gives the bonus after a fully accepted block

A tree frame (``parents``) is fed the same way, its draft tokens in frame order with a
tree attention mask (:mod:`tandemspec.cloud.target`), so row ``m + i + 1`` is the target's
distribution after draft token ``i`` and its path; the draft rows are those of
:class:`~tandemspec.sampling.DraftTree` shifted by ``m``. A chain is the tree ``-1, 0, 1, ...``:
one verification path serves both.

Labels (the SPRINTER label, "would standard verification accept this token?"):

* draft tokens: what :func:`verify_greedy` / :func:`verify_sampling` return;
* committed tokens: the frame carries no q for them, so in both modes the label is
  "the token is the target's argmax" (greedy acceptance; deterministic, costs no draws).

``target_top_k`` (when the handshake asked for it): per labelled position, the
distribution the session samples from (``process_logits``) truncated with
:func:`truncate`. Greedy sessions get the untempered softmax instead, since their
processed distribution is a one-hot that would teach a drafter nothing.

The logits stay torch tensors where the target ran; :mod:`tandemspec.cloud.probs` computes
what is needed there and the acceptance rule itself is :mod:`tandemspec.sampling`'s, so only
argmaxes, p of the draft tokens and drawn ids come to the host.

Merged continuations (:func:`merge_frames`): a pipelined frame and its queued continuation
are judged as one frame whose tree hangs the continuation's roots under the first frame's
tip (two chains make one longer chain). Each part keeps its own random stream (``streams``:
uniforms drawn per part, and the correction or bonus from the part whose rows the walk
stopped in), so a merged judgement makes exactly the draws, and decisions, of the two
frames judged one after the other with the first's bonus deferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandemspec.cloud import probs as dist
from tandemspec.sampling import DraftTree, Judgement, TreeOps, accept_drafts, seeded_rng, verify_greedy, walk_tree
from tandemspec.types import DraftFrame, SamplingParams, SparseDist


@dataclass(frozen=True)
class FrameOutcome:
    """What verification decided for one frame."""

    num_committed: int
    path: tuple[int, ...]  # accepted draft tokens' indices, root to leaf
    next_token: int | None  # correction or bonus; None when the bonus is deferred
    labels: tuple[bool, ...]  # committed tokens first, then draft tokens
    target_top_k: tuple[SparseDist, ...]
    fully_accepted: bool  # the path reached the frame's tip (a chain: every draft token)

    @property
    def num_accepted(self) -> int:
        return len(self.path)


Stream = tuple[int, int]  # a merged frame's part: (index of its first draft token, its first draft position)


def merge_frames(first: DraftFrame, continuation: DraftFrame) -> tuple[DraftFrame, tuple[Stream, ...]]:
    """``first`` and its ``continuation`` as one frame (the continuation's roots under ``first``'s tip), and the
    parts' random streams for :func:`judge_frame`. ``continuation`` carries no committed tokens."""
    k = len(first.draft_ids)
    assert k and not continuation.committed_ids, (first, continuation)
    later = DraftTree.of(continuation.parents, len(continuation.draft_ids)).parents
    parents = DraftTree.of(first.parents, k).parents + tuple(k - 1 if p < 0 else k + p for p in later)
    merged = DraftFrame(
        seq=first.seq,
        epoch=first.epoch,
        position=first.position,
        committed_ids=first.committed_ids,
        draft_ids=first.draft_ids + continuation.draft_ids,
        draft_dists=first.draft_dists + continuation.draft_dists,
        expects_continuation=continuation.expects_continuation,
        parents=() if DraftTree(parents).is_chain else parents,
    )
    return merged, (own_stream(first)[0], (k, continuation.position))


def own_stream(frame: DraftFrame) -> tuple[Stream]:
    """A frame judged alone: one part, seeded at its first draft token's position."""
    return ((0, frame.position + len(frame.committed_ids)),)


def judge_frame(
    logits: torch.Tensor,
    frame: DraftFrame,
    sampling: SamplingParams,
    return_top_k: int,
    defer_bonus: bool | None = None,
    streams: tuple[Stream, ...] = (),
) -> FrameOutcome:
    """Verify ``frame`` given the target's ``logits``: [1 + m + k, vocab] (see module doc).

    ``defer_bonus``: no bonus after a fully accepted frame (default: ``frame.expects_continuation``).
    ``streams``: the parts of a merged frame (:func:`merge_frames`); default the frame alone.
    """
    m, k = len(frame.committed_ids), len(frame.draft_ids)
    assert logits.shape[0] == 1 + m + k, (tuple(logits.shape), m, k)
    committed_labels = label_committed(logits[:m], frame.committed_ids)
    defer = frame.expects_continuation if defer_bonus is None else defer_bonus
    judgement = judge_draft(logits[m:], frame, sampling, defer, streams or own_stream(frame))
    top_k = target_top_k(logits[: m + k], sampling, return_top_k)
    return FrameOutcome(
        num_committed=m,
        path=judgement.path,
        next_token=judgement.next_token,
        labels=committed_labels + judgement.labels,
        target_top_k=top_k,
        fully_accepted=DraftTree.of(frame.parents, k).reaches_tip(judgement.path),
    )


def label_committed(logits: torch.Tensor, committed_ids: tuple[int, ...]) -> tuple[bool, ...]:
    """Committed-token labels: is each token the target's argmax? ``logits``: [m, vocab]."""
    if not committed_ids:
        return ()
    argmax = logits.argmax(-1).tolist()  # [m]; host sync: m ints
    return tuple(argmax[i] == token for i, token in enumerate(committed_ids))


def judge_draft(
    logits: torch.Tensor, frame: DraftFrame, sampling: SamplingParams, defer: bool, streams: tuple[Stream, ...]
) -> Judgement:
    """Greedy or rejection-sampling verification of the draft tokens. ``logits``: [k + 1, vocab]."""
    if sampling.is_greedy:
        argmax = logits.argmax(-1).tolist()  # host sync: k + 1 ints
        return verify_greedy(argmax, frame.draft_ids, defer_bonus=defer, parents=frame.parents)
    rngs = [(start, seeded_rng(sampling.seed, position)) for start, position in streams]
    return verify_sampling(dist.process_probs(logits, sampling), frame, rngs, defer)


def verify_sampling(
    target_probs: torch.Tensor,
    frame: DraftFrame,
    rngs: list[tuple[int, np.random.Generator]],
    defer: bool,
) -> Judgement:
    """``tandemspec.sampling.verify_sampling`` with p on the device: the same draws, in the same order.

    ``target_probs``: [k + 1, vocab] processed p per row (see :class:`~tandemspec.sampling.DraftTree`).
    ``rngs``: per part (index of its first draft token, its stream), in order; one part: the frame.
    A part's tokens take uniforms from its stream; the final draw comes from the part whose
    rows the walk stopped in (part ``i`` starts at row ``start_i``: the row after the
    previous part's tip, its last token).
    """
    k = len(frame.draft_ids)
    tree = DraftTree.of(frame.parents, k)
    ends = [start for start, _ in rngs[1:]] + [k]
    uniforms = np.concatenate([rng.random(end - start) for (start, rng), end in zip(rngs, ends, strict=True)])

    def stream_of(row: int) -> np.random.Generator:
        return next(rng for start, rng in reversed(rngs) if start <= row)

    rows = torch.tensor(tree.rows(), dtype=torch.long, device=target_probs.device)
    draft = torch.tensor(frame.draft_ids, dtype=torch.long, device=target_probs.device)
    p_draft = target_probs[rows, draft].tolist()  # host sync: k floats
    labels = accept_drafts(p_draft, frame.draft_ids, frame.draft_dists, uniforms)
    ops: TreeOps[torch.Tensor] = TreeOps(
        row=lambda row: target_probs[row],
        prob=lambda p, token: float(p[token]),  # host sync: one float, only for a second sibling on
        residual=dist.residual,
        sample=lambda p, row: dist.sample(p, stream_of(row)),
    )
    return walk_tree(tree, frame.draft_ids, frame.draft_dists, labels, uniforms, ops, defer)


def target_top_k(logits: torch.Tensor, sampling: SamplingParams, top_k: int) -> tuple[SparseDist, ...]:
    """Per row of ``logits`` ([n, vocab]): the target's distribution truncated to ``top_k`` ids."""
    if top_k <= 0 or logits.shape[0] == 0:
        return ()
    probs = torch.softmax(logits.double(), -1) if sampling.is_greedy else dist.process_probs(logits, sampling)
    return tuple(dist.truncate(row, top_k) for row in probs)


def generate_token(logits: torch.Tensor, sampling: SamplingParams, position: int) -> int:
    """The target's own choice for ``position`` (cloud-only mode). ``logits``: [vocab]."""
    if sampling.is_greedy:
        return int(logits.argmax())  # host sync: one int
    probs = dist.process_probs(logits[None], sampling)[0]  # [vocab]
    return dist.sample(probs, seeded_rng(sampling.seed, position))
