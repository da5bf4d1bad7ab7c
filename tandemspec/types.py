"""Domain types shared by edge and cloud, and the glossary.

Glossary
--------
session
    One generation: a ``Decode`` stream from its ``SessionOpen`` to its end. The cloud holds
    the target's KV cache for it.
round
    One draft frame and its verdict.
draft
    Tokens proposed by the drafter, to be judged by the target.
accepted
    Draft tokens the target's verification kept.
rejected
    The first draft token verification refused, and every draft token after it.
correction
    The token the target puts at the first rejection (argmax for greedy, a sample from the
    residual max(0, p - q) for sampling).
tree
    Draft tokens with parents (``DraftFrame.parents``): several candidate continuations
    verified in one target pass; the verdict names the accepted path. A chain is the tree
    whose parents are ``-1, 0, 1, ...``. A tree's *tip* is its last token; *fully accepted*
    means the accepted path reached it (for a chain: every draft token accepted).
bonus
    The extra target token after a fully accepted block. A frame sent with
    ``expects_continuation`` defers its bonus (the pipelined next frame continues instead),
    unless its continuation is *merged* into the same target pass, or the session is greedy
    and ``keeps_bonus``: then the bonus is sent and the continuation stays live only when
    its tip path starts with that bonus (docs/architecture.md "Pipelining").
committed
    Tokens the edge's gate trusted and emitted without judgement; the cloud appends them
    to its context and labels them, but never replaces them.
epoch
    The number of rollbacks in a session. Every rejection starts a new epoch; a frame
    stamped with an older epoch was drafted on a discarded future and is *stale*.
branch
    A frame drafted before an earlier frame's verdict on a guess of it (``DraftFrame.branch_of``):
    a rejection and its correction, or another bonus. Its first draft token is the guessed
    token, in the epoch that verdict would leave; it is live only when the guess came true,
    else stale with no pass (docs/architecture.md "Branches").
position
    Absolute index in the session's token sequence (the prompt starts at 0).
bundle
    The edge's versioned model folder: ``drafter.onnx``, ``gate.onnx``, tokenizer, manifest.
label
    Per token the target processed: would standard verification have accepted it
    (the SPRINTER label). Committed tokens are labelled too; they train the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Literal

DecodeMode = Literal["lossless", "gated", "local", "cloud"]
DECODE_MODES: tuple[DecodeMode, ...] = ("lossless", "gated", "local", "cloud")


class SessionKind(Enum):
    """What the cloud does in a session."""

    VERIFY = "verify"  # judge the edge's drafts
    GENERATE = "generate"  # the target generates every token (cloud-only mode)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` means greedy; 0 disables top-k/top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:  # NaN fails this too
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class SparseDist:
    """A distribution over a few token ids (the rest have probability 0)."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]

    def prob_of(self, token: int) -> float:
        """Probability of ``token`` (0 when outside the support)."""
        for token_id, prob in zip(self.ids, self.probs, strict=True):
            if token_id == token:
                return prob
        return 0.0


@dataclass(frozen=True)
class Limits:
    """What a verifier accepts per session."""

    max_context_tokens: int
    max_draft_tokens: int
    max_new_tokens: int
    max_return_top_k: int
    max_support: int  # largest truncated-q support per draft token


@dataclass(frozen=True)
class ServerInfo:
    """Answer of ``Info``."""

    model_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    limits: Limits
    capabilities: tuple[str, ...]
    server_version: str
    device: str
    dtype: str


@dataclass(frozen=True)
class SessionOpen:
    """First edge frame of a session (the handshake)."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    tokenizer_fingerprint: str
    kind: SessionKind = SessionKind.VERIFY
    return_top_k: int = 0  # target top-k probabilities per labelled position (0 = none)
    stop_ids: tuple[int, ...] = ()  # generate sessions stop after emitting one of these
    client_id: str = ""
    # Greedy pipelining: the edge applies the bonus rule (see ``bonus`` above), so the
    # verifier may send a pipelined frame's bonus instead of deferring it.
    keeps_bonus: bool = False


@dataclass(frozen=True)
class DraftFrame:
    """One round's proposal: committed tokens first, then draft tokens, from ``position``."""

    seq: int
    epoch: int
    position: int
    committed_ids: tuple[int, ...] = ()
    draft_ids: tuple[int, ...] = ()
    # Sampling only: the drafter's exact truncated q for each draft token.
    draft_dists: tuple[SparseDist, ...] = ()
    # Pipelining: a fully accepted block gets no bonus; the next frame continues it.
    expects_continuation: bool = False
    # Tree drafts: the parent of each draft token, an index into ``draft_ids`` that is lower
    # than its own (-1 = after the committed tokens); empty = a chain.
    parents: tuple[int, ...] = ()
    # A branch: pre-drafted on a guess of frame ``branch_of``'s verdict (its first draft token is
    # the guessed correction or bonus); live only when that guess comes true (docs/architecture.md
    # "Branches"). None: an ordinary frame.
    branch_of: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.committed_ids) + len(self.draft_ids)


@dataclass(frozen=True)
class Verdict:
    """The cloud's authoritative answer to one draft frame."""

    seq: int
    epoch: int  # the session's epoch after this verdict
    committed_length: int  # tokens in the session after this verdict (prompt included)
    num_committed: int = 0  # committed tokens of the frame (they lead ``labels``)
    num_accepted: int = 0  # accepted draft tokens
    next_token: int | None = None  # correction or bonus; None when deferred or stale
    labels: tuple[bool, ...] = ()  # committed tokens first, then draft tokens
    target_top_k: tuple[SparseDist, ...] = ()  # per labelled position, when asked
    compute_ms: float = 0.0
    stale: bool = False
    # Tree frames: the accepted draft tokens' indices, root to leaf; empty when they are the
    # first ``num_accepted`` tokens (always so for a chain).
    accepted_nodes: tuple[int, ...] = ()
    # Judged in the previous verdict's target pass (a merged continuation): no pass of its own.
    shared_pass: bool = False
    # From the verifier taking the frame to this verdict (the pass and any wait for a batch), ms.
    server_ms: float = 0.0

    @property
    def accepted_path(self) -> tuple[int, ...]:
        """Indices of the accepted draft tokens, root to leaf."""
        return self.accepted_nodes or tuple(range(self.num_accepted))

    @property
    def fully_accepted(self) -> bool:
        """The accepted path reached the frame's tip, its last draft token (a chain: all of them)."""
        num_draft = len(self.labels) - self.num_committed
        path = self.accepted_path
        return not self.stale and (num_draft == 0 or (bool(path) and path[-1] == num_draft - 1))


@dataclass(frozen=True)
class SessionReady:
    """The cloud's answer to a handshake: the prompt is prefilled."""

    session_id: str
    prompt_length: int
    prefill_ms: float


@dataclass(frozen=True)
class GeneratedTokens:
    """Tokens the target generated in a ``GENERATE`` session."""

    ids: tuple[int, ...]
    compute_ms: float


@dataclass(frozen=True)
class SessionDone:
    """Last cloud frame of a session that ended normally."""

    reason: str
    num_generated: int = 0


@dataclass(frozen=True)
class SessionClose:
    """The edge ends a session (normally or to cancel)."""

    reason: str = ""
