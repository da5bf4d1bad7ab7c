"""Sessions: handshake and frame validation, per-session state, admission control.

A :class:`Session` keeps the invariant ``kv.length == len(tokens) - 1``: every token but
the last has been fed through the target, and the last (the prompt's last token, or the
latest correction or bonus) is *pending*, fed with the next frame. Its logits judge the
frame's first token, so no logits need to be kept between frames.

Validation never trusts the client: every id is checked against the vocabulary, every
size against the advertised :class:`~tandemspec.types.Limits`, and the write position
against the session's own committed length.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import uuid
from dataclasses import dataclass

import grpc

from tandemspec.cloud.target import ForwardRow, SessionKV
from tandemspec.cloud.verify import FrameOutcome
from tandemspec.sampling import DraftTree, chain_parents
from tandemspec.types import DraftFrame, Limits, SessionKind, SessionOpen, Verdict

_Q_SUM_TOLERANCE = 1e-3  # float32 rounding of a few dozen probabilities


class SessionError(Exception):
    """Ends one session with a gRPC status; the server and other sessions carry on."""

    def __init__(self, code: grpc.StatusCode, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.seq = seq


def invalid(message: str, seq: int = 0) -> SessionError:
    return SessionError(grpc.StatusCode.INVALID_ARGUMENT, message, seq)


@dataclass(frozen=True)
class SessionRules:
    """What a handshake and its frames are checked against."""

    limits: Limits
    vocab_size: int
    tokenizer_fingerprint: str


def validate_open(message: SessionOpen, rules: SessionRules) -> SessionOpen:
    """Check a handshake; returns it with ``max_new_tokens`` 0 replaced by the server's limit.

    Length rule (refused with ``OUT_OF_RANGE`` before any prefill): the prompt must leave
    room for the smallest unit of work within ``max_context_tokens``. A VERIFY session's
    first frame needs the prompt + one draft token + the correction after it, so
    ``len(prompt_ids) + 2 <= max_context_tokens``; a GENERATE session needs the prompt + one
    generated token, so ``len(prompt_ids) + 1 <= max_context_tokens``.
    """
    limits = rules.limits
    if message.tokenizer_fingerprint != rules.tokenizer_fingerprint:
        raise SessionError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"tokenizer fingerprint {message.tokenizer_fingerprint!r} does not match the target's "
            f"{rules.tokenizer_fingerprint!r}: edge and cloud must share one tokenizer",
        )
    if not message.prompt_ids:
        raise invalid("the prompt is empty")
    room = 2 if message.kind is SessionKind.VERIFY else 1  # draft + correction, or one generated token
    if len(message.prompt_ids) + room > limits.max_context_tokens:
        raise SessionError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"prompt of {len(message.prompt_ids)} tokens leaves no room for {room} more in max_context_tokens "
            f"{limits.max_context_tokens} (a {message.kind.value} session needs prompt + {room} <= the limit)",
        )
    check_ids(message.prompt_ids, rules.vocab_size, "prompt_ids")
    check_ids(message.stop_ids, rules.vocab_size, "stop_ids")
    if message.max_new_tokens > limits.max_new_tokens:
        raise invalid(f"max_new_tokens {message.max_new_tokens} is over the limit {limits.max_new_tokens}")
    if message.return_top_k > limits.max_return_top_k:
        raise invalid(f"return_top_k {message.return_top_k} is over the limit {limits.max_return_top_k}")
    if message.max_new_tokens == 0:
        return dataclasses.replace(message, max_new_tokens=limits.max_new_tokens)
    return message


def check_ids(ids: tuple[int, ...], vocab_size: int, what: str, seq: int = 0) -> None:
    """Every id must lie in ``[0, vocab_size)`` (uint32 on the wire, so never negative)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise invalid(f"{what} holds id {bad[0]} outside the vocabulary of {vocab_size}", seq)


def validate_frame(frame: DraftFrame, session: Session, rules: SessionRules, position: int | None = None) -> None:
    """Check a current (not stale) frame against the session and the limits.

    ``position``: where the frame must start (default: the session's committed length; a
    continuation checked for merging starts where its predecessor's tip ends).
    """
    seq, limits = frame.seq, rules.limits
    expected = session.committed_length if position is None else position
    if frame.epoch > session.epoch:
        raise invalid(f"frame epoch {frame.epoch} is ahead of the session's epoch {session.epoch}", seq)
    if frame.position != expected:
        raise invalid(f"frame position {frame.position} != committed length {expected}", seq)
    for what, ids in (("draft_ids", frame.draft_ids), ("committed_ids", frame.committed_ids)):
        if len(ids) > limits.max_draft_tokens:
            raise invalid(f"{len(ids)} {what} exceed max_draft_tokens {limits.max_draft_tokens}", seq)
        check_ids(ids, rules.vocab_size, what, seq)
    _check_parents(frame)
    if not session.open.sampling.is_greedy:
        _check_draft_dists(frame, rules)
    # The request's own length, not the server's load: OUT_OF_RANGE (the edge may go on in a
    # fresh session), never RESOURCE_EXHAUSTED (which reads as "busy").
    needed = expected + frame.num_tokens + 1
    if needed > session.max_tokens:
        raise SessionError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"the frame would grow the session to {needed} tokens (committed + frame tokens + correction), "
            f"over its budget of {session.max_tokens} tokens "
            "(min of max_context_tokens and prompt + max_new_tokens + max_draft_tokens + 1)",
            seq,
        )


def check_branch(frame: DraftFrame, session: Session) -> None:
    """A branch frame's shape: greedy sessions that keep the bonus, draft tokens only, an earlier frame's seq."""
    if not session.keeps_bonus:
        raise invalid(
            "branch frames need a greedy session that keeps the bonus (keeps_bonus, temperature 0, return_top_k 0)",
            frame.seq,
        )
    if frame.committed_ids or not frame.draft_ids:
        raise invalid("a branch frame carries draft tokens only, its guessed correction or bonus first", frame.seq)
    if frame.branch_of is not None and frame.branch_of >= frame.seq:
        raise invalid(f"frame {frame.seq} branches from frame {frame.branch_of}, not an earlier one", frame.seq)


def _check_parents(frame: DraftFrame) -> None:
    """Tree drafts: one parent per draft token, each before its child (-1 = after the committed tokens)."""
    if not frame.parents:
        return
    if len(frame.parents) != len(frame.draft_ids):
        raise invalid(f"{len(frame.draft_ids)} draft tokens but {len(frame.parents)} parents", frame.seq)
    for index, parent in enumerate(frame.parents):
        if not -1 <= parent < index:
            raise invalid(
                f"draft token {index} has parent {parent}: a parent must be -1 or the index of an earlier draft token",
                frame.seq,
            )


def _check_draft_dists(frame: DraftFrame, rules: SessionRules) -> None:
    """Sampling mode: one exact truncated q per draft token, each a proper small distribution."""
    seq = frame.seq
    if len(frame.draft_dists) != len(frame.draft_ids):
        raise invalid(
            f"sampling mode needs one draft distribution per draft token: {len(frame.draft_ids)} tokens, "
            f"{len(frame.draft_dists)} distributions",
            seq,
        )
    for index, (token, dist) in enumerate(zip(frame.draft_ids, frame.draft_dists, strict=True)):
        if len(dist.ids) > rules.limits.max_support:
            raise invalid(
                f"draft distribution {index} has support {len(dist.ids)} > max_support {rules.limits.max_support}", seq
            )
        check_ids(dist.ids, rules.vocab_size, f"draft distribution {index}", seq)
        if len(set(dist.ids)) != len(dist.ids):
            raise invalid(f"draft distribution {index} repeats a token id", seq)
        total = math.fsum(dist.probs)
        if abs(total - 1.0) > _Q_SUM_TOLERANCE:
            raise invalid(f"draft distribution {index} sums to {total:.6f}, not 1", seq)
        if dist.prob_of(token) <= 0.0:
            raise invalid(f"draft token {index} ({token}) has probability 0 under its own distribution", seq)


class Session:
    """Mutable state of one Decode stream; only that stream's handler task touches it."""

    def __init__(
        self,
        open_message: SessionOpen,
        max_tokens: int,
        reserved_bytes: int,
        client: str | None = None,
        expires_s: float = math.inf,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.open = open_message
        self.max_tokens = max_tokens  # budget: tokens this session may ever hold
        self.reserved_bytes = reserved_bytes
        self.client = client  # admission key (see client_key); None: not capped
        self.expires_s = expires_s  # monotonic time at which the session's TTL ends it
        self.stepping = False  # counted by the scheduler as a session that submits steps
        self.ended = False  # logically over: slot released, only SessionDone left to send
        self.tokens: list[int] = list(open_message.prompt_ids)
        self.kv = SessionKV.empty()
        self.epoch = 0
        self.num_generated = 0
        # The last verdict sent a pipelined frame's bonus (greedy, keeps_bonus): the next frame
        # may be that frame's continuation, one position back (see :meth:`rebase_on_bonus`).
        self.bonus_kept = False
        # The seq of the last frame judged (not stale): the only frame whose branches may be live.
        self.last_judged_seq: int | None = None

    @property
    def kind(self) -> SessionKind:
        return self.open.kind

    @property
    def prompt_length(self) -> int:
        return len(self.open.prompt_ids)

    @property
    def committed_length(self) -> int:
        """Tokens in the session (prompt included), the pending one too."""
        return len(self.tokens)

    def prefill_ids(self) -> tuple[int, ...]:
        """Prompt tokens to feed before the first frame (all but the pending last one)."""
        return tuple(self.tokens[:-1])

    def pending_ids(self, frame: DraftFrame | None = None) -> tuple[int, ...]:
        """Tokens to feed next: the pending token, then the frame's committed and draft tokens."""
        pending = tuple(self.tokens[self.kv.length :])
        if frame is None:
            return pending
        return pending + frame.committed_ids + frame.draft_ids

    def step_row(self, frame: DraftFrame) -> ForwardRow:
        """The target step that verifies ``frame``: pending, committed and draft tokens, logits for each.

        A tree frame's parents become the fed tokens' own (:class:`~tandemspec.cloud.target.ForwardRow`):
        the pending and committed tokens are a chain, a draft token whose parent is -1 follows
        the last of them. Built here from the validated parents, never from a client mask.
        """
        input_ids = self.pending_ids(frame)
        parents: tuple[int, ...] = ()
        if frame.parents and not DraftTree(frame.parents).is_chain:
            base = len(input_ids) - len(frame.draft_ids)  # fed tokens before the draft tokens
            parents = chain_parents(base) + tuple(base + parent for parent in frame.parents)
        num_judged = 1 + frame.num_tokens  # the pending token, then committed and draft tokens
        return ForwardRow(self.kv, input_ids, num_logits=num_judged, parents=parents)

    @property
    def keeps_bonus(self) -> bool:
        """A greedy session whose edge keeps the bonus (``keeps_bonus``) and asked for no top-k (its
        labelled positions stay those of the frames sent): the bonus rule and branches apply."""
        opened = self.open
        return opened.keeps_bonus and opened.sampling.is_greedy and not opened.return_top_k

    def defers_bonus(self, frame: DraftFrame) -> bool:
        """Whether a fully accepted ``frame`` gets no bonus: it expects a continuation, and the
        session does not keep the bonus (:attr:`keeps_bonus`). A frame with no draft tokens
        (gated mode's labels-only frame) always defers."""
        return frame.expects_continuation and not (self.keeps_bonus and bool(frame.draft_ids))

    def is_continuation(self, frame: DraftFrame, of: DraftFrame) -> bool:
        """Whether ``frame`` continues ``of`` from its tip, in the same epoch: it can share ``of``'s pass."""
        if not of.draft_ids or not of.expects_continuation or frame.committed_ids or frame.epoch != of.epoch:
            return False
        if frame.branch_of is not None:  # a guess of of's verdict, not its continuation
            return False
        tip = DraftTree.of(of.parents, len(of.draft_ids)).tip_path()
        return frame.position == of.position + len(of.committed_ids) + len(tip)

    def rebase_on_bonus(self, frame: DraftFrame) -> Rebased | None:
        """The bonus rule, after a verdict that sent a pipelined frame's bonus (``bonus_kept``).

        ``frame`` at one position before the committed length was drafted on that frame's tip
        before the bonus was known. It stays live when its tip path starts with the bonus: the
        bonus is then that root, and what is left to verify is the root's subtree, from the
        committed length (:class:`Rebased`); otherwise it is stale (None). A frame elsewhere is
        not a continuation and is returned as it is. The edge applies the same rule.
        """
        if not self.bonus_kept or frame.position != self.committed_length - 1 or frame.committed_ids:
            return Rebased(frame, ())
        return self._rebase_on_root(frame)

    def rebase_branch(self, frame: DraftFrame) -> Rebased | None:
        """A branch (``frame.branch_of`` set, shape checked by :func:`check_branch`): what is left to
        verify, or None (stale).

        It is live when the frame it guessed at was the last one judged, it is in the epoch that
        verdict left, and it starts with that verdict's correction or bonus at that token's
        position: its context is then exactly the one the edge drafted it on (one verdict, one
        outcome). What is left to verify is its root's subtree, as with the bonus rule.
        """
        if (
            frame.branch_of != self.last_judged_seq
            or frame.epoch != self.epoch
            or frame.position != self.committed_length - 1
        ):
            return None
        return self._rebase_on_root(frame)

    def _rebase_on_root(self, frame: DraftFrame) -> Rebased | None:
        """``frame`` at one position before the committed length: its tip path's root must be the
        last committed token; then the root's subtree from the committed length, else None."""
        tree = DraftTree.of(frame.parents, len(frame.draft_ids))
        root = tree.tip_path()[0] if frame.draft_ids else -1
        if root < 0 or frame.draft_ids[root] != self.tokens[-1]:
            return None
        kept = [root]  # the root's subtree, in frame order (parents before children)
        for i in range(root + 1, len(frame.draft_ids)):
            if tree.parents[i] in kept:
                kept.append(i)
        nodes = tuple(kept[1:])
        index = {node: i for i, node in enumerate(nodes)}
        parents = tuple(index.get(tree.parents[n], -1) for n in nodes)
        rebased = dataclasses.replace(
            frame,
            position=frame.position + 1,
            draft_ids=tuple(frame.draft_ids[n] for n in nodes),
            draft_dists=tuple(frame.draft_dists[n] for n in nodes) if frame.draft_dists else (),
            parents=() if DraftTree(parents).is_chain else parents,
        )
        return Rebased(rebased, (root, *nodes))

    def stale_verdict(self, frame: DraftFrame) -> Verdict:
        """Answer to a frame drafted before the latest rollback: not verified."""
        return Verdict(seq=frame.seq, epoch=self.epoch, committed_length=self.committed_length, stale=True)

    def apply_verdict(self, frame: DraftFrame, outcome: FrameOutcome, kv: SessionKV, compute_ms: float) -> Verdict:
        """Commit a verified frame: append, compact the KV to the accepted path, advance the epoch on rejection.

        ``kv`` holds the session's past and every fed token (draft tokens last, in frame order).
        """
        self.tokens.extend(frame.committed_ids)
        self.tokens.extend(frame.draft_ids[i] for i in outcome.path)
        if outcome.next_token is not None:
            self.tokens.append(outcome.next_token)
        if not outcome.fully_accepted:
            self.epoch += 1
        # Rollback: keep the accepted path's KV only (a crop for a chain), and the last token pending.
        first_draft = kv.length - len(frame.draft_ids)
        kept = kv.select(first_draft, [first_draft + i for i in outcome.path])
        self.kv = kept.crop(len(self.tokens) - 1)
        chain = outcome.path == tuple(range(outcome.num_accepted))
        return Verdict(
            seq=frame.seq,
            epoch=self.epoch,
            committed_length=self.committed_length,
            num_committed=outcome.num_committed,
            num_accepted=outcome.num_accepted,
            next_token=outcome.next_token,
            labels=outcome.labels,
            target_top_k=outcome.target_top_k,
            compute_ms=compute_ms,
            accepted_nodes=() if chain else outcome.path,
        )

    def append_generated(self, token: int, kv: SessionKV) -> None:
        """Cloud-only mode: the target chose ``token``; it becomes the pending token."""
        self.tokens.append(token)
        self.kv = kv
        self.num_generated += 1

    def generation_done(self) -> str | None:
        """Why a GENERATE session stops now, or None to go on."""
        if self.num_generated and self.tokens[-1] in self.open.stop_ids:
            return "stop"
        if self.num_generated >= self.open.max_new_tokens:
            return "length"
        if self.committed_length + 1 > self.max_tokens:
            return "context"
        return None


@dataclass(frozen=True)
class Rebased:
    """A frame as it is verified, and how its draft tokens map back to the frame the edge sent.

    ``origin`` empty: the frame is the edge's own. Else ``origin[0]`` is the sent frame's root
    that the bonus already committed and ``origin[1 + i]`` the sent index of draft token ``i``.
    """

    frame: DraftFrame
    origin: tuple[int, ...]

    def verdict_for_sent(self, verdict: Verdict, sent: DraftFrame) -> Verdict:
        """``verdict`` (of :attr:`frame`) restated for ``sent``: the root first on the path, labels per sent token."""
        if not self.origin:
            return verdict
        root, nodes = self.origin[0], self.origin[1:]
        path = (root, *(nodes[i] for i in verdict.accepted_path))
        labels = [False] * len(sent.draft_ids)  # tokens off the root's subtree were never fed: not accepted
        labels[root] = True  # the root is the target's own token (the bonus)
        for i, label in enumerate(verdict.labels):
            labels[nodes[i]] = label
        chain = path == tuple(range(len(path)))
        return dataclasses.replace(
            verdict, num_accepted=len(path), labels=tuple(labels), accepted_nodes=() if chain else path
        )


def split_merged(verdict: Verdict, first: DraftFrame, later: DraftFrame, epoch_before: int) -> tuple[Verdict, Verdict]:
    """The verdict of a merged frame (:func:`~tandemspec.cloud.verify.merge_frames`) as the two
    frames' verdicts: ``first``'s (no bonus when its tip was reached: ``later`` continued it)
    and ``later``'s (``shared_pass``), or ``later`` stale when ``first`` was not fully accepted.
    ``epoch_before``: the session's epoch before the pass."""
    m, k = len(first.committed_ids), len(first.draft_ids)
    path = verdict.accepted_path
    first_path = tuple(i for i in path if i < k)
    if k - 1 not in first_path:  # first stopped short of its tip: the verdict is all first's
        own = dataclasses.replace(
            verdict,
            labels=verdict.labels[: m + k],
            target_top_k=verdict.target_top_k[: m + k],
            accepted_nodes=() if first_path == tuple(range(len(first_path))) else first_path,
        )
        stale = Verdict(seq=later.seq, epoch=verdict.epoch, committed_length=verdict.committed_length, stale=True)
        return own, stale
    later_path = tuple(i - k for i in path if i >= k)
    own = Verdict(
        seq=first.seq,
        epoch=epoch_before,
        committed_length=first.position + m + len(first_path),
        num_committed=m,
        num_accepted=len(first_path),
        labels=verdict.labels[: m + k],
        target_top_k=verdict.target_top_k[: m + k],
        compute_ms=verdict.compute_ms,
        server_ms=verdict.server_ms,
        accepted_nodes=() if first_path == tuple(range(len(first_path))) else first_path,
    )
    continued = Verdict(
        seq=later.seq,
        epoch=verdict.epoch,
        committed_length=verdict.committed_length,
        num_accepted=len(later_path),
        next_token=verdict.next_token,
        labels=verdict.labels[m + k :],
        target_top_k=verdict.target_top_k[m + k :],
        compute_ms=verdict.compute_ms,
        server_ms=verdict.server_ms,
        accepted_nodes=() if later_path == tuple(range(len(later_path))) else later_path,
        shared_pass=True,
    )
    return own, continued


def session_token_budget(message: SessionOpen, limits: Limits) -> int:
    """Most tokens a session may hold: what its KV reservation is sized for."""
    wanted = len(message.prompt_ids) + message.max_new_tokens + limits.max_draft_tokens + 1
    return min(limits.max_context_tokens, wanted)


class AdmissionBook:
    """Admission control: at most ``max_sessions`` sessions, ``per_client`` of them per client,
    and ``budget_bytes`` of reserved KV.

    A refused handshake waits up to ``wait_s`` for a slot to free before it is refused
    with ``RESOURCE_EXHAUSTED``: an edge that ends a session and opens the next at once must
    not find its own previous session still holding the slot.
    """

    def __init__(
        self, max_sessions: int, budget_bytes: int, per_client: int | None = None, wait_s: float = 0.0
    ) -> None:
        self.max_sessions = max_sessions
        self.budget_bytes = budget_bytes
        self.per_client = max_sessions if per_client is None else per_client
        self.wait_s = wait_s
        self.num_sessions = 0
        self.reserved_bytes = 0
        self._held: collections.Counter[str] = collections.Counter()
        self._freed = asyncio.Event()  # set (and replaced) whenever a session is released

    def held_by(self, client: str) -> int:
        """Sessions ``client`` holds now."""
        return self._held[client]

    async def admit(self, client: str | None, reserve_bytes: int) -> None:
        """Reserve room for one session of ``client``, waiting up to ``wait_s``; or RESOURCE_EXHAUSTED."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            freed = self._freed
            try:
                self.admit_now(client, reserve_bytes)
                return
            except SessionError:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                self.admit_now(client, reserve_bytes)  # a last try; raises the current reason
                return

    def admit_now(self, client: str | None, reserve_bytes: int) -> None:
        """Reserve room for one session of ``client`` (None: uncapped) now, or refuse it with RESOURCE_EXHAUSTED."""
        if self.num_sessions >= self.max_sessions:
            raise SessionError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is full ({self.max_sessions} sessions)")
        if client is not None and self._held[client] >= self.per_client:
            raise SessionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client} already holds {self._held[client]} sessions, the most one client may hold "
                f"(max_sessions_per_client {self.per_client})",
            )
        if self.reserved_bytes + reserve_bytes > self.budget_bytes:
            raise SessionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"KV memory budget exhausted: the session needs {reserve_bytes} bytes, "
                f"{self.budget_bytes - self.reserved_bytes} of {self.budget_bytes} are free",
            )
        self.num_sessions += 1
        self.reserved_bytes += reserve_bytes
        if client is not None:
            self._held[client] += 1

    def release(self, client: str | None, reserve_bytes: int) -> None:
        """Give back one session's slot and reservation, and wake waiting handshakes."""
        self.num_sessions -= 1
        self.reserved_bytes -= reserve_bytes
        if client is not None:
            self._held[client] -= 1
            if self._held[client] <= 0:
                del self._held[client]
        self._freed.set()
        self._freed = asyncio.Event()


def client_key(peer: str, client_id: str, authenticated: bool) -> str | None:
    """Who a session belongs to, for ``max_sessions_per_client``; None: not capped.

    With auth on, every caller has proved it holds the token, so its handshake ``client_id``
    names it (one shared token would otherwise make all edges one client). Otherwise the
    peer's host does, since a client_id costs nothing to forge. Loopback peers are not
    capped: they are processes on the server's own machine (a co-located edge, a benchmark),
    and gRPC shares one connection among a process's channels, so they cannot be told apart.
    ``peer`` is gRPC's ``context.peer()``: ``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``, ``unix:...``.
    """
    if authenticated and client_id:
        return f"id:{client_id}"
    scheme, _, address = peer.partition(":")
    if scheme == "unix":
        return None
    if scheme not in ("ipv4", "ipv6"):
        return peer
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "::1" or host.startswith(("127.", "::ffff:127.")):
        return None
    return host
