"""The hybrid decoding loop: draft on the edge, verify in the cloud, fall back to local.

Modes (docs/architecture.md "Decoding modes"):

``lossless``
    Chain speculative decoding (Leviathan et al., arXiv:2211.17192; Chen et al.,
    arXiv:2302.01318): the drafter proposes a block, the cloud judges every token, the
    output follows the target exactly. With pipelining (depth 1) the next block is drafted
    optimistically and sent before the previous verdict arrives, hiding the round trip;
    a rejection rolls the drafter back and the in-flight frame comes back stale. A greedy
    pipelined frame keeps its bonus (``keep_bonus``): the verifier sends it, and the frame in
    flight after it stays live only when its tip path starts with that bonus (the *bonus
    rule*, which the verifier applies too), else it is stale at once; a continuation that is
    already queued at the verifier shares its predecessor's target pass instead. With a
    tree budget (``tree_budget > 0``) each frame is an EAGLE-2-style draft tree
    (:mod:`tandemspec.edge.tree`) of that many tokens and the verdict names the accepted
    path; a pipelined frame then assumes the path to the tree's tip accepted.
``local``
    The drafter alone; also what any mode continues with when the cloud is lost.
``cloud``
    The target generates every token (a ``GENERATE`` session).
``gated``
    SPRINTER-style approximate verification (arXiv:2502.04557) with a :class:`TrustGate`:
    each drafted token the gate trusts is emitted at once and later sent as *committed*
    (the cloud feeds it and returns its label, never replaces it); the first token it
    doubts - or the next token once ``gate_check_every`` tokens went by unchecked - starts
    a block the cloud verifies as in ``lossless``. A gate that trusts nothing is lossless
    decoding without pipelining; one that trusts everything (with no periodic check) is
    local decoding that still sends its tokens for labels. Not pipelined.

One step of the loop is ``draft -> send -> await verdict -> commit``; each is a small method
of :class:`_Generation`, which holds one generation's state. The committed sequence
(prompt + tokens the cloud confirmed or the edge emitted locally) is the single source of
truth: emitted text is always exactly its generated part, so a switch to local decoding
mid-generation neither loses nor repeats a token.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tandemspec.edge.autodraft import CostEstimator, Costs
from tandemspec.edge.client import (
    CLOSE_GRACE_S,
    CloudBusy,
    CloudRefused,
    CloudUnavailable,
    DecodeStream,
    TokenizerMismatch,
    VerifierClient,
)
from tandemspec.edge.devicelog import DeviceLog, RoundRecord, TokenRecord
from tandemspec.edge.drafter import OnnxDrafter
from tandemspec.edge.features import token_features
from tandemspec.edge.gate import TrustGate
from tandemspec.edge.proposal import draft_distribution, local_distribution
from tandemspec.edge.stats import GenerationResult, StatsCounter
from tandemspec.edge.tokenizer import EdgeTokenizer, TextTracker
from tandemspec.edge.tree import GreedyStep, TreeShape, grow_tree
from tandemspec.sampling import DraftTree, sample, sample_dense, seeded_rng
from tandemspec.types import (
    DecodeMode,
    DraftFrame,
    GeneratedTokens,
    Limits,
    SamplingParams,
    SessionClose,
    SessionDone,
    SessionKind,
    SessionOpen,
    SessionReady,
    SparseDist,
    Verdict,
)

logger = logging.getLogger(__name__)

_DRAFT_STREAM = 0x45444745  # "EDGE": the edge's random stream, apart from the cloud's
TREES_CAPABILITY = "trees"  # in Info.capabilities: the verifier checks DraftFrame.parents
BRANCHES_CAPABILITY = "branches"  # in Info.capabilities: the verifier takes DraftFrame.branch_of


@dataclass(frozen=True)
class DecoderConfig:
    """How the edge decodes (one per daemon; a request may override the mode)."""

    mode: DecodeMode = "lossless"
    draft_length: int = 4
    pipeline: bool = True
    max_support: int = 32  # truncated-q support; capped by the verifier's limit
    return_top_k: int = 0  # ask the target for its top-k per token (logged for learning)
    client_id: str = ""
    # gated mode: verify the next token once this many went by unchecked (0 = only when doubted)
    gate_check_every: int = 16
    # lossless mode: draft trees of this many tokens per frame (0 = chains of draft_length)
    tree_budget: int = 0
    # children per expanded node and nodes expanded per depth, and the deepest a tree grows:
    # the best of the shapes tried on the reference pair (docs/trees.md)
    tree_top_k: int = 2
    tree_depth: int = 16
    # greedy pipelining: the verifier sends a pipelined frame's bonus and both sides apply the
    # bonus rule (docs/architecture.md "Pipelining"); False: the bonus is deferred
    keep_bonus: bool = True
    # lossless: choose each frame's draft length (chains, up to auto_max_draft; draft_length is unused)
    # or tree budget (trees, up to tree_budget) from the measured round trip, verify cost, drafter
    # cost and acceptance (edge/autodraft.py)
    auto_draft: bool = False
    auto_max_draft: int = 16
    # greedy pipelined chains that keep the bonus: while a frame's verdict is awaited, pre-draft up
    # to this many branches, its likeliest other outcomes (a rejection and its correction, another
    # bonus) by the drafter's probabilities, and send them; the verifier goes on with the one that
    # came true without waiting for the edge (docs/architecture.md "Branches"). 0 = none. The
    # drafting spent on them stays within the measured round trip: none on a link with no delay.
    branches: int = 2

    def __post_init__(self) -> None:
        if self.draft_length < 1 or self.max_support < 1:
            raise ValueError("draft_length and max_support must be >= 1")
        if self.tree_budget < 0 or self.tree_top_k < 1 or self.tree_depth < 1:
            raise ValueError("tree_budget must be >= 0, tree_top_k and tree_depth >= 1")
        if self.branches < 0:
            raise ValueError(f"branches must be >= 0, got {self.branches}")
        if self.gate_check_every < 0:
            raise ValueError(f"gate_check_every must be >= 0, got {self.gate_check_every}")
        if self.auto_draft and self.auto_max_draft < 1:
            raise ValueError(f"auto_draft needs auto_max_draft >= 1, got {self.auto_max_draft}")


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to produce."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    mode: DecodeMode | None = None  # None = the decoder's configured mode


class DraftPolicy(Protocol):
    """Decides, per drafted token, whether to draft another (the uncertainty gate plugs in here)."""

    uses_features: bool  # whether keep_drafting reads ``features`` (computed only then, or when logging)

    def keep_drafting(self, index: int, features: np.ndarray | None) -> bool:
        """``index``: tokens drafted so far in this block; ``features`` [1, feature_dim]: the gate's
        features of the last of them (:func:`~tandemspec.edge.features.token_features`), or None
        when the policy does not use them."""
        ...


@dataclass(frozen=True)
class FixedLength:
    """Draft exactly ``length`` tokens per block."""

    length: int
    uses_features: bool = False

    def keep_drafting(self, index: int, features: np.ndarray | None) -> bool:
        return index < self.length


TokenCallback = Callable[[list[int], str], None]  # (new token ids, new text)


class HybridDecoder:
    """Generates completions with a drafter, a verifier client and an optional device log."""

    def __init__(
        self,
        drafter: OnnxDrafter,
        tokenizer: EdgeTokenizer,
        client: VerifierClient | None,
        config: DecoderConfig | None = None,
        log: DeviceLog | None = None,
        policy: DraftPolicy | None = None,
        gate: TrustGate | None = None,
    ) -> None:
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.client = client
        self.config = config or DecoderConfig()
        self.log = log
        config = self.config
        self.policy = policy or FixedLength(config.auto_max_draft if config.auto_draft else config.draft_length)
        self.gate = gate  # gated mode's trust decision
        # What rounds cost on this decoder's link and verifier, kept across generations (auto_draft).
        self.costs = CostEstimator(tree_top_k=config.tree_top_k)
        # The session this decoder ended last: the next one opens once the verifier has ended
        # it (its SessionDone), so back-to-back generations never find their own slot still held.
        self.closing_stream: DecodeStream | None = None
        self.warned_no_branches = False  # said once per decoder that the verifier takes no branches

    def generate(self, request: GenerationRequest, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """Produce one completion; never raises for a lost cloud (it falls back to ``local``)."""
        if not request.prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        if request.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if (request.mode or self.config.mode) == "gated" and self.gate is None:
            raise ValueError("gated mode needs a trust gate (the bundle's gate.onnx, or an entropy/top1 baseline)")
        if len(request.prompt_ids) >= self.drafter.capacity:
            raise ValueError(
                f"prompt of {len(request.prompt_ids)} tokens leaves no room (capacity {self.drafter.capacity})"
            )
        return _Generation(self, request, on_tokens).run()


@dataclass
class _SentFrame:
    """A draft frame in flight, with what the edge needs when its verdict comes back."""

    frame: DraftFrame
    features: np.ndarray | None  # [m + k, feature_dim] when logging: committed tokens, then drafts
    stale: bool = False
    # The bonus rule kept it live: the index of its draft token that the previous verdict's
    # bonus already committed (the first of its tip path), else None.
    bonus_root: int | None = None
    sent_s: float = 0.0  # perf_counter when sent
    alone: bool = False  # sent with no live frame in flight: its verdict times a clean round trip
    # Per draft token, when branching: the drafter's logits it was drafted from (for its runner-up).
    logit_rows: tuple[np.ndarray, ...] = ()
    guess: bool = False  # a branch whose guess is not settled yet (by its frame's verdict)
    branched: bool = False  # its branches have been sent
    ranks: tuple[int, ...] = ()  # a tree's tokens' places by score (GrownTree.ranks), for auto_draft
    greedy_steps: Mapping[int, GreedyStep] = field(default_factory=dict)  # a greedy tree's, when logging

    @property
    def live(self) -> bool:
        """Counts on the verifier judging it: not stale, not an unsettled branch."""
        return not self.stale and not self.guess

    def tip_path(self) -> list[int]:
        """Its draft tokens the next frame assumes accepted and not yet committed."""
        frame = self.frame
        path = DraftTree.of(frame.parents, len(frame.draft_ids)).tip_path()
        return path[1:] if self.bonus_root is not None else path


@dataclass
class _Block:
    ids: list[int]
    dists: list[SparseDist]
    features: np.ndarray | None
    ends_with_eos: bool
    parents: tuple[int, ...] = ()  # a tree's (empty: a chain)
    logit_rows: tuple[np.ndarray, ...] = ()  # see _SentFrame.logit_rows
    ranks: tuple[int, ...] = ()  # a tree's tokens' places by score
    greedy_steps: Mapping[int, GreedyStep] = field(default_factory=dict)  # see GrownTree.greedy_steps


class _Generation:
    """The state of one generation and the steps of its loop."""

    def __init__(self, decoder: HybridDecoder, request: GenerationRequest, on_tokens: TokenCallback | None) -> None:
        self.decoder = decoder
        self.drafter = decoder.drafter
        self.request = request
        self.sampling = request.sampling
        self.mode: DecodeMode = request.mode or decoder.config.mode
        self.prompt_length = len(request.prompt_ids)
        self.committed: list[int] = list(request.prompt_ids)
        self.eos = set(decoder.tokenizer.eos_ids)
        self.text = TextTracker(decoder.tokenizer, request.stop_strings)
        self.on_tokens = on_tokens
        self.finish_reason: str | None = None
        self.stats = StatsCounter(mode_requested=self.mode, bundle_version=self.drafter.manifest.version_label)
        self.limit = min(self.prompt_length + request.max_new_tokens, self.drafter.capacity)
        self.session_id = ""
        self.stream: DecodeStream | None = None
        self.tree_budget = 0  # tokens per draft tree once the verifier is known to check trees (0 = chains)
        self.branches = 0  # branches per frame, once the verifier is known to take them

    # -- orchestration ---------------------------------------------------------------

    def run(self) -> GenerationResult:
        start = time.perf_counter()
        if self.request.max_new_tokens == 0:
            self.finish_reason = "length"
        elif self.mode in ("lossless", "gated", "cloud"):
            self._run_cloud_mode()
        if self.finish_reason is None:
            self._run_local()
        self.stats.wall_s = time.perf_counter() - start
        generated = self.committed[self.prompt_length :]
        return GenerationResult(
            prompt_ids=self.request.prompt_ids,
            token_ids=tuple(generated),
            text=self.text.final_text(),
            finish_reason=self.finish_reason or "length",
            stats=self.stats.freeze(len(generated)),
        )

    def _run_cloud_mode(self) -> None:
        client = self.decoder.client
        if client is None:
            self._fall_back("no verifier configured")
            return
        try:
            info = client.ensure_connected()
            edge_fingerprint = self.drafter.manifest.tokenizer_fingerprint
            if info.tokenizer_fingerprint != edge_fingerprint:
                raise TokenizerMismatch(edge_fingerprint, info.tokenizer_fingerprint)
            self.limits = info.limits
            if self.mode == "cloud":
                self._run_generate()
            else:
                self._size_verify(info.limits)
                self.tree_budget = self.decoder.config.tree_budget if TREES_CAPABILITY in info.capabilities else 0
                if self.decoder.config.tree_budget and not self.tree_budget:
                    logger.warning("the verifier does not verify draft trees: drafting chains")
                self.branches = self._branches_allowed(info.capabilities)
                if self.mode == "gated":
                    self._run_gated(info.limits.max_draft_tokens)
                else:
                    self._run_lossless()
            self.stats.mode_used = self.mode
        except CloudBusy as error:  # the verifier is healthy but full: this request only goes local
            self._fall_back(str(error), "busy")
        except CloudUnavailable as error:
            if self.stream is not None:
                client.record_failure()
            self._fall_back(str(error), "unavailable")
        finally:
            self._close_stream()

    def _branches_allowed(self, capabilities: tuple[str, ...]) -> int:
        """Branches per frame for this generation: greedy pipelined lossless chains that keep the bonus."""
        config = self.decoder.config
        if not config.branches:
            return 0
        fits = (
            self.mode == "lossless"
            and config.pipeline
            and config.keep_bonus
            and self.sampling.is_greedy
            and not self.tree_budget
            and not config.return_top_k
        )
        if fits and BRANCHES_CAPABILITY not in capabilities and not self.decoder.warned_no_branches:
            self.decoder.warned_no_branches = True
            logger.warning("the verifier does not take branch frames: pipelining without them")
        return config.branches if fits and BRANCHES_CAPABILITY in capabilities else 0

    def _fall_back(self, reason: str, kind: str = "unavailable") -> None:
        logger.warning("continuing locally after %d tokens: %s", len(self.committed) - self.prompt_length, reason)
        self.stats.fell_back_to_local = True
        self.stats.fallback_kind = kind
        self.stats.fallback_reason = reason
        self.stats.fallback_at_token = len(self.committed) - self.prompt_length

    def _close_stream(self, reason: str | None = None) -> None:
        """End the current session: normally (``reason`` or the finish reason), else abort the call."""
        if self.stream is None:
            return
        reason = reason or self.finish_reason
        if reason is not None:  # a normal end: say so and let the verifier close the stream
            self.stream.send(SessionClose(reason=reason))
        self.stats.add_stream(self.stream)
        self.stream.close(cancel=reason is None)  # a failure or an exception: abort the call
        self.decoder.closing_stream = self.stream if reason is not None else None
        self.stream = None

    # -- sessions ---------------------------------------------------------------------

    def _open(self, kind: SessionKind, max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> DecodeStream:
        """Open a session from the committed sequence, asking for ``max_new_tokens`` more."""
        assert self.decoder.client is not None
        closing, self.decoder.closing_stream = self.decoder.closing_stream, None
        if closing is not None and not closing.wait_closed(CLOSE_GRACE_S):
            logger.debug("the previous session had not ended after %.1f s", CLOSE_GRACE_S)
        self.stream = self.decoder.client.open_stream()
        self.stats.num_sessions += 1
        self.stream.send(
            SessionOpen(
                prompt_ids=tuple(self.committed),
                sampling=self.sampling,
                max_new_tokens=max_new_tokens,
                tokenizer_fingerprint=self.drafter.manifest.tokenizer_fingerprint,
                kind=kind,
                return_top_k=self.decoder.config.return_top_k,
                stop_ids=stop_ids,
                client_id=self.decoder.config.client_id,
                keeps_bonus=self.decoder.config.keep_bonus and kind is SessionKind.VERIFY,
            )
        )
        ready = self.stream.recv()
        if not isinstance(ready, SessionReady):
            raise CloudRefused(None, f"expected SessionReady, got {type(ready).__name__}")
        self.session_id = ready.session_id
        self.stats.prefill_ms += ready.prefill_ms
        return self.stream

    def _run_generate(self) -> None:
        """Cloud-only mode: the target generates, the edge streams what arrives.

        A request longer than the verifier's ``max_new_tokens`` continues in a fresh session
        from what has been generated so far.
        """
        cloud_max_new = self.limits.max_new_tokens
        if self.limits.max_context_tokens:
            self.limit = min(self.limit, self.limits.max_context_tokens - 1)
        while self.finish_reason is None:
            budget = self.limit - len(self.committed)
            if budget <= 0:
                self.finish_reason = "length"
                break
            stream = self._open(SessionKind.GENERATE, min(budget, cloud_max_new or budget), tuple(self.eos))
            start_length = len(self.committed)
            while self.finish_reason is None:
                message = stream.recv()
                if isinstance(message, GeneratedTokens):
                    self.stats.verify_compute_s += message.compute_ms / 1000
                    self.stats.num_target_passes += len(message.ids)
                    self._emit(list(message.ids))
                elif isinstance(message, SessionDone):
                    if self.committed[-1] in self.eos:
                        self.finish_reason = "stop"
                    elif len(self.committed) == start_length:
                        raise CloudRefused(None, f"the verifier ended a generate session at once ({message.reason})")
                    break  # the session's share is done: the outer loop opens the next one if room is left
                else:
                    raise CloudRefused(None, f"unexpected {type(message).__name__} in a generate session")
            self._close_stream(reason=self.finish_reason or "renew")

    # -- verify sessions: sized to the verifier's limits, renewed past them ---------------

    def _size_verify(self, limits: Limits) -> None:
        """Fit draft length, q support and the generation's length to the verifier's limits."""
        config = self.decoder.config
        wanted = config.auto_max_draft if config.auto_draft else config.draft_length
        self.max_draft = max(1, min(wanted, limits.max_draft_tokens or wanted))
        self.max_frame = limits.max_draft_tokens or config.tree_budget  # draft tokens one frame may carry
        self.max_support = max(1, min(config.max_support, limits.max_support or config.max_support))
        if limits.max_context_tokens:
            self.limit = min(self.limit, limits.max_context_tokens - 1)  # the correction/bonus may add one more
        self._open_verify()

    def _open_verify(self) -> None:
        """Open a VERIFY session from the committed sequence (lossless and gated).

        A session may grow by the verifier's ``max_new_tokens`` (its budget adds one frame and
        a correction on top): the edge never drafts past ``session_limit``, and a generation
        longer than that continues in a fresh session (:meth:`_renew_verify`) instead of being
        refused mid-stream.
        """
        wanted = self.limit - len(self.committed) + 1  # the last correction/bonus may pass the limit
        cloud_max_new = self.limits.max_new_tokens
        granted = min(wanted, cloud_max_new) if cloud_max_new else wanted
        self._open(SessionKind.VERIFY, granted)
        self.session_limit = min(self.limit, len(self.committed) + granted)
        self.epoch, self.seq = 0, 0
        self.in_flight: deque[_SentFrame] = deque()

    def _renew_verify(self) -> bool:
        """At the session's limit: close it and open the next one, if the generation has room left."""
        if self.session_limit >= self.limit:
            return False
        self._close_stream(reason="renew")
        self._open_verify()
        return True

    def _run_lossless(self) -> None:
        """Lossless speculative decoding, pipelined when configured."""
        self._sync_drafter(self.committed)
        while self.finish_reason is None:
            self._fill_pipeline()
            if not self.in_flight:
                if self._renew_verify():
                    continue
                self.finish_reason = "length"  # no room left to draft
                break
            assert self.stream is not None
            self._await_verdict(self.stream)

    # -- lossless steps: draft -> send -> await verdict -> commit -------------------------

    def _tip(self) -> list[int]:
        """Committed ids followed by the drafts of frames in flight in the current epoch."""
        tip = list(self.committed)
        for sent in self.in_flight:
            if sent.live:
                tip.extend(sent.frame.draft_ids[i] for i in sent.tip_path())
        return tip

    def _fill_pipeline(self) -> None:
        """Send frames until one (no pipelining) or two (depth-1 pipelining) are live, then branches."""
        self._fill_live()
        self._send_branches()

    def _fill_live(self) -> None:
        """Send frames until one (no pipelining) or two (depth-1 pipelining) are live.

        A pipelined frame assumes the live one before it fully accepted: for a tree, that the
        path to its tip (its last token, the end of the drafter's likeliest path) is accepted.
        """
        config = self.decoder.config
        depth = 2 if config.pipeline else 1
        # A kept bonus comes with the frame's verdict: a frame whose tip and bonus reach the limit is the last.
        bonus = int(config.keep_bonus and self.sampling.is_greedy)
        while sum(s.live for s in self.in_flight) < depth:
            live = [s for s in self.in_flight if s.live]
            if live and not live[-1].frame.expects_continuation:
                return  # the last live frame ends the generation if accepted
            tip = self._tip()
            room = self.session_limit - len(tip)
            if room <= 0:
                return
            self._sync_drafter(tip)  # branches may have left the drafter on another context
            if self.tree_budget:
                budget = min(self.tree_budget, self.max_frame)
                if config.auto_draft:
                    budget = self.decoder.costs.choose_budget(budget, depth > 1, nested=self.sampling.is_greedy)
                block = self._draft_tree(tip, min(budget, room))
                tip_depth = len(DraftTree(block.parents).tip_path())
                is_last = block.ids[-1] in self.eos or len(tip) + tip_depth + bonus >= self.session_limit
            else:
                length = self.decoder.costs.choose(self.max_draft, depth > 1) if config.auto_draft else self.max_draft
                block = self._draft(tip, min(length, room), since_check=len(tip) - len(self.committed))
                is_last = block.ends_with_eos or len(tip) + len(block.ids) + bonus >= self.session_limit
            self._send(len(tip), block, expects_continuation=depth > 1 and not is_last)

    def _send_branches(self) -> None:
        """While the first live frame's verdict is awaited, draft and send its likeliest other
        outcomes as branches (``branch_of``), stopping once that verdict has arrived.

        A branch that comes true saves the link's round trip (and the drafting of the next frame),
        so the drafting spent on branches per verdict stays within the link's measured round trip
        (``Costs.link_rtt_s``: without the verifier's wait for a batch, which a branch does not
        save): none over a link with almost no delay or to a merely busy verifier, up to
        ``branches`` over a slow link.

        A branch starts with its guess, the drafter's runner-up at a token of the frame (that token
        rejected, the runner-up its correction) or at the continuation's first token (the frame
        fully accepted, the runner-up its bonus), then drafts on from it. Guesses are ranked by the
        drafter's probability of that outcome: the product of the frame's tokens before it and the
        runner-up's.
        """
        if not self.branches:
            return
        live = [s for s in self.in_flight if s.live]
        if not live or live[0].branched or not live[0].logit_rows:
            return
        first = live[0]
        first.branched = True
        assert self.stream is not None
        config = self.decoder.config
        ahead = self.in_flight.index(first)  # frames whose verdicts come before first's (stale ones)
        costs = self.decoder.costs.costs()
        length = self.decoder.costs.choose(self.max_draft, True) if config.auto_draft else self.max_draft
        if not branch_fits(costs, length):
            return  # not even one fits (a fast link): no guesses computed either
        frame = first.frame
        known = int(first.bonus_root is not None)  # the frame's root is committed already
        start = time.perf_counter()
        for position, token, epoch, source, guessed_from in self._branch_guesses(
            first, live[1] if len(live) > 1 else None
        ):
            if self.stream.num_pending() > ahead:  # first's verdict is here: guessing it saves nothing now
                return
            if not branch_fits(costs, length, spent_s=time.perf_counter() - start):
                return
            accepted = frame.draft_ids[known : position - frame.position - len(frame.committed_ids)]
            context = [*self.committed, *accepted, token]
            room = self.session_limit - len(context)
            if room <= 0:
                continue
            self._sync_drafter(context)
            block = self._draft(context, min(length, room), since_check=len(context) - len(self.committed))
            is_last = block.ends_with_eos or len(context) + len(block.ids) + 1 >= self.session_limit
            features = None
            if block.features is not None and source is not None:
                features = np.concatenate([source[None], block.features])
            branch = _Block(
                ids=[token, *block.ids],
                dists=[],
                features=features,
                ends_with_eos=block.ends_with_eos,
                logit_rows=(guessed_from, *block.logit_rows),  # the root is committed when it is live
            )
            self._send(position, branch, expects_continuation=not is_last, branch_of=frame.seq, epoch=epoch)
            self.stats.num_branch_frames += 1

    def _branch_guesses(
        self, first: _SentFrame, later: _SentFrame | None
    ) -> list[tuple[int, int, int, np.ndarray | None, np.ndarray]]:
        """The ``branches`` likeliest other outcomes of ``first``'s verdict: (position, guessed token,
        the epoch that verdict leaves, the guessed token's feature row when logging, the logits it
        was guessed from), likeliest first."""
        frame = first.frame
        known = first.bonus_root is not None  # its root is committed: judged already
        base = frame.position + len(frame.committed_ids)
        features = first.features
        scored: list[tuple[float, int, int, int, np.ndarray | None, np.ndarray]] = []
        log_p = 0.0  # of the frame's tokens so far all being the target's
        for j in range(int(known), len(frame.draft_ids)):
            logits = first.logit_rows[j]
            chosen, runner, runner_log_p = _runner_up(logits, frame.draft_ids[j])
            row = features[len(frame.committed_ids) + j] if features is not None else None
            scored.append((log_p + runner_log_p, base + j, runner, self.epoch + 1, row, logits))  # rejected at j
            log_p += chosen
        if later is not None and later.logit_rows and frame.expects_continuation:
            logits = later.logit_rows[0]  # the continuation's first token is the bonus guess
            _, runner, runner_log_p = _runner_up(logits, later.frame.draft_ids[0])
            row = later.features[0] if later.features is not None else None
            scored.append((log_p + runner_log_p, base + len(frame.draft_ids), runner, self.epoch, row, logits))
        scored = [g for g in scored if g[2] not in self.eos and np.isfinite(g[0])]
        scored.sort(key=lambda g: -g[0])
        return [g[1:] for g in scored[: self.branches]]

    def _draft(
        self,
        tip: list[int],
        max_tokens: int,
        since_check: int,
        first: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> _Block:
        """Draft up to ``max_tokens`` tokens after ``tip`` (the drafter then lacks only the last).

        ``since_check``: tokens between the last verified point and the first drafted token
        (the gate's ``position`` feature of that token; the next ones count on from it).
        ``first``: the drafter's (logits, hidden) rows for the position after ``tip``, when
        the caller already ran it (gated mode); else the drafter is extended here.
        """
        start = time.perf_counter()
        if first is None:
            logits, hidden = self.drafter.extend(tip[self.drafter.length :])
            logits_row, hidden_row = logits[-1], hidden[-1]
        else:
            logits_row, hidden_row = first
        policy = self.decoder.policy
        with_features = self.decoder.log is not None or policy.uses_features
        ids: list[int] = []
        dists: list[SparseDist] = []
        rows: list[np.ndarray] = []
        logit_rows: list[np.ndarray] = []
        while True:
            token, dist = self._pick(logits_row, len(tip) + len(ids))
            if self.branches:
                logit_rows.append(logits_row)
            features = None
            if with_features:
                features = token_features(logits_row[None], hidden_row[None], np.array([since_check + len(ids)]))
                rows.append(features[0])
            ids.append(token)
            if dist is not None:
                dists.append(dist)
            if token in self.eos or len(ids) >= max_tokens or not policy.keep_drafting(len(ids), features):
                break
            logits, hidden = self.drafter.extend([token])
            logits_row, hidden_row = logits[-1], hidden[-1]
        block_features = np.stack(rows) if rows and self.decoder.log is not None else None
        elapsed = time.perf_counter() - start
        self.stats.draft_s += elapsed
        self.decoder.costs.observe_draft(elapsed, len(ids))
        return _Block(
            ids=ids,
            dists=dists,
            features=block_features,
            ends_with_eos=ids[-1] in self.eos,
            logit_rows=tuple(logit_rows),
        )

    def _draft_tree(self, tip: list[int], budget: int) -> _Block:
        """An EAGLE-2-style tree of at most ``budget`` tokens after ``tip`` (the drafter then holds all of ``tip``)."""
        start = time.perf_counter()
        config = self.decoder.config
        logits, hidden = self.drafter.extend(tip[self.drafter.length :])
        depth = max(1, min(config.tree_depth, self.drafter.capacity - len(tip) - 1))  # within the drafter's capacity
        shape = TreeShape(budget, config.tree_top_k, depth)
        # Logging a greedy tree: what a greedy chain would have drafted through it (edge.tree's docstring).
        logged = self.decoder.log is not None and self.sampling.is_greedy
        greedy_from = (hidden[-1], len(tip) - len(self.committed)) if logged else None
        tree = grow_tree(self.drafter, logits[-1], shape, self.sampling, self.max_support, self.eos, greedy_from)
        elapsed = time.perf_counter() - start
        self.stats.draft_s += elapsed
        self.decoder.costs.observe_tree_draft(tree.parents, elapsed)
        return _Block(
            list(tree.ids),
            list(tree.dists),
            None,
            ends_with_eos=False,
            parents=tree.parents,
            ranks=tree.ranks,
            greedy_steps=tree.greedy_steps,
        )

    def _pick(self, logits: np.ndarray, position: int) -> tuple[int, SparseDist | None]:
        """The drafted token at ``position`` and, when sampling, the exact truncated q it came from."""
        if self.sampling.is_greedy:
            return int(np.argmax(logits)), None
        q = draft_distribution(logits, self.sampling, self.max_support)
        return sample(q, seeded_rng(self.sampling.seed, position, _DRAFT_STREAM)), q

    def _send(
        self,
        position: int,
        block: _Block,
        expects_continuation: bool,
        committed_ids: tuple[int, ...] = (),
        committed_features: np.ndarray | None = None,
        branch_of: int | None = None,
        epoch: int | None = None,
    ) -> None:
        """Send a frame: ``committed_ids`` (gated mode's trusted tokens) from ``position``, then the block.

        ``branch_of``, ``epoch``: a branch of that frame, in the epoch its guessed verdict leaves."""
        assert self.stream is not None
        frame = DraftFrame(
            seq=self.seq,
            epoch=self.epoch if epoch is None else epoch,
            position=position,
            committed_ids=committed_ids,
            draft_ids=tuple(block.ids),
            draft_dists=tuple(block.dists),
            expects_continuation=expects_continuation,
            parents=block.parents,
            branch_of=branch_of,
        )
        self.seq += 1
        alone = not any(s.live for s in self.in_flight)  # stale frames cost the verifier no pass
        sent_s = time.perf_counter()
        self.stream.send(frame)
        self.stats.num_cloud_frames += 1
        parts = [f for f in (committed_features, block.features) if f is not None]
        features = np.concatenate(parts) if parts else None
        sent = _SentFrame(
            frame,
            features,
            sent_s=sent_s,
            alone=alone,
            logit_rows=block.logit_rows,
            guess=branch_of is not None,
            ranks=block.ranks,
            greedy_steps=block.greedy_steps,
        )
        self.in_flight.append(sent)

    def _await_verdict(self, stream: DecodeStream) -> None:
        message = stream.recv()
        if not isinstance(message, Verdict):
            raise CloudRefused(None, f"expected a Verdict, got {type(message).__name__}")
        sent = self.in_flight.popleft()
        if message.seq != sent.frame.seq:
            raise CloudRefused(None, f"verdict for frame {message.seq} while frame {sent.frame.seq} was expected")
        if sent.frame.branch_of is not None and message.stale != sent.stale:
            raise CloudRefused(
                None,
                f"the verifier found branch frame {message.seq} {'stale' if message.stale else 'live'}, "
                f"the edge {'stale' if sent.stale else 'live'}",
            )
        if message.stale or sent.stale:
            if sent.frame.branch_of is None:  # a branch's wrong guess is no waste of the pipeline
                self.stats.num_stale_frames += 1
            return
        self._observe_costs(sent, message)
        self._commit(sent, message)

    def _observe_costs(self, sent: _SentFrame, verdict: Verdict) -> None:
        """Feed the decoder's cost estimates (auto_draft): the round trip, and a round's pass and acceptance
        (a tree's also its committed tokens and whether it reached its tip, for its budget)."""
        costs, frame = self.decoder.costs, sent.frame
        compute_s = verdict.compute_ms / 1000.0
        if sent.alone:
            elapsed = time.perf_counter() - sent.sent_s
            link = elapsed - verdict.server_ms / 1000.0 if verdict.server_ms > 0 else None  # older verifiers: None
            costs.observe_rtt(elapsed - compute_s, link)
        known = 0 if sent.bonus_root is None else 1  # a kept continuation's root was judged earlier
        if frame.parents and not frame.committed_ids:
            num_new = verdict.num_accepted - known + (verdict.next_token is not None)
            pass_s = None if verdict.shared_pass else compute_s
            ranks = sent.ranks if self.sampling.is_greedy else ()  # greedy: what smaller budgets would accept
            costs.observe_tree_round(frame.parents, verdict.accepted_path, num_new, sent.bonus_root, pass_s, ranks)
        elif frame.draft_ids and not frame.committed_ids and not verdict.shared_pass:
            num_draft = len(frame.draft_ids) - known
            costs.observe_round(num_draft, verdict.num_accepted - known, verdict.fully_accepted, compute_s)

    def _commit(self, sent: _SentFrame, verdict: Verdict) -> None:
        """Apply an authoritative verdict: emit accepted tokens and the correction or bonus."""
        frame = sent.frame
        known = 0 if sent.bonus_root is None else 1  # the root the previous verdict's bonus committed
        if frame.position + len(frame.committed_ids) + known != len(self.committed):
            raise CloudRefused(
                None,
                f"frame at {frame.position} (+{len(frame.committed_ids) + known} committed) judged while "
                f"{len(self.committed)} tokens are committed",
            )
        path = verdict.accepted_path
        if any(not 0 <= i < len(frame.draft_ids) for i in path) or (known and path[:1] != (sent.bonus_root,)):
            raise CloudRefused(None, f"verdict names draft tokens {path} of a frame of {len(frame.draft_ids)}")
        accepted = [frame.draft_ids[i] for i in path[known:]]
        new = accepted + ([verdict.next_token] if verdict.next_token is not None else [])
        self.stats.add_verdict(len(frame.draft_ids), verdict, known)
        self._log_round(sent, verdict)
        if verdict.committed_length != len(self.committed) + len(new):
            raise CloudRefused(
                None, f"verdict says {verdict.committed_length} tokens, edge counts {len(self.committed) + len(new)}"
            )
        rejected = not verdict.fully_accepted
        kept_bonus = frame.expects_continuation and not rejected and verdict.next_token is not None
        if kept_bonus and verdict.epoch == self.epoch and self.sampling.is_greedy:
            self.stats.num_bonus_kept += 1
            self._emit(new)
            self._apply_bonus_rule(verdict.next_token, frame.seq)
        elif rejected or verdict.next_token is not None or verdict.epoch != self.epoch:
            # The future the later frames were drafted on is gone: they come back stale.
            for later in self.in_flight:
                if not later.guess:  # branches are settled below, by this verdict
                    later.stale = True
            self.epoch = verdict.epoch
            self._emit(new)
            self._settle_branches(sent.frame.seq)
            self._sync_drafter(self.committed)
        else:
            self._emit(new)
            self._settle_branches(None)  # judged without a correction or bonus: no guess came true

    def _apply_bonus_rule(self, bonus: int | None, judged_seq: int) -> None:
        """A pipelined frame came back with its bonus: the next live frame, drafted on that frame's
        tip before the bonus was known, stays live when its tip path starts with the bonus (which
        then commits that first token); else it and the frames after it are stale (the verifier
        applies the same rule and spends no pass on them), and a branch that guessed the bonus
        may take its place."""
        live = [s for s in self.in_flight if s.live]
        if live:
            first = live[0]
            root = first.tip_path()[0] if first.frame.draft_ids and first.bonus_root is None else None
            if root is not None and first.frame.draft_ids[root] == bonus:
                first.bonus_root = root
                self._settle_branches(None)  # the verifier judges the continuation next: no branch is live
                return
            for later in live:
                later.stale = True
        self._settle_branches(judged_seq)
        self._sync_drafter(self.committed)

    def _settle_branches(self, judged_seq: int | None) -> None:
        """After frame ``judged_seq``'s verdict (None: a frame no branch may follow), settle the branches
        in flight: the one that guessed that verdict becomes live, its root committed; the others are
        stale. The verifier applies the same rule (``Session.rebase_branch``)."""
        taken = settled = False
        for sent in self.in_flight:
            if not sent.guess:
                continue
            settled = True
            frame = sent.frame
            sent.guess = False
            hit = (
                not taken
                and judged_seq is not None
                and frame.branch_of == judged_seq
                and frame.epoch == self.epoch
                and frame.position == len(self.committed) - 1
                and frame.draft_ids[0] == self.committed[-1]
            )
            if hit:
                sent.bonus_root = 0
                taken = True
                self.stats.num_branch_hits += 1
            else:
                sent.stale = True
        if settled and judged_seq is not None:  # a continuation that was live settles nothing: no guess was needed
            self.decoder.costs.observe_branches(taken)

    def _sync_drafter(self, ids: list[int]) -> None:
        """Roll the drafter back to the longest cached prefix of ``ids``, leaving at least one token to feed."""
        cached = self.drafter.tokens
        n = min(len(cached), len(ids) - 1)
        mismatch = np.flatnonzero(cached[:n] != np.asarray(ids[:n], dtype=np.int64))
        self.drafter.rollback(int(mismatch[0]) if mismatch.size else n)

    def _log_round(self, sent: _SentFrame, verdict: Verdict) -> None:
        log = self.decoder.log
        if log is None:
            return
        frame = sent.frame
        top_k = verdict.target_top_k or ()
        if frame.parents:
            tokens = self._tree_round_tokens(sent, verdict)
            position = frame.position + (sent.bonus_root is not None)  # where its first logged token sits
            top_k = ()  # the target's top-k comes per tree node, not per token of the logged chain
        elif sent.features is not None:
            num_committed = len(frame.committed_ids)
            tokens = tuple(
                TokenRecord(
                    token_id=token,
                    committed=i < num_committed,
                    label=bool(label),
                    features=sent.features[i],
                    target_top_k=top_k[i] if i < len(top_k) else None,
                )
                for i, (token, label) in enumerate(
                    zip(frame.committed_ids + frame.draft_ids, verdict.labels, strict=False)
                )
            )
            position = frame.position
        else:
            return
        if not tokens:
            return
        log.record_round(
            RoundRecord(
                session=self.session_id,
                position=position,
                mode=self.mode,
                tokens=tokens,
                temperature=self.sampling.temperature,
                bundle_version=self.drafter.manifest.model_version,
                context_ids=tuple(self.committed) if top_k else None,
            )
        )

    @staticmethod
    def _tree_round_tokens(sent: _SentFrame, verdict: Verdict) -> tuple[TokenRecord, ...]:
        """A greedy tree's round as the greedy chain through it would have gone: from the context (or
        a kept bonus root), the drafter's top token at each step, labelled by whether it is the
        target's token there (the next accepted node's, or the verdict's correction or bonus),
        following the accepted path up to the first token the target rejects."""
        frame, steps = sent.frame, sent.greedy_steps
        path = verdict.accepted_path[int(sent.bonus_root is not None) :]
        node = -1 if sent.bonus_root is None else sent.bonus_root
        tokens: list[TokenRecord] = []
        for depth in range(len(path) + 1):
            step = steps.get(node)
            target = frame.draft_ids[path[depth]] if depth < len(path) else verdict.next_token
            if step is None or target is None:  # a node the tree never expanded, or a deferred bonus
                break
            label = step.token == target
            tokens.append(TokenRecord(token_id=step.token, committed=False, label=label, features=step.features))
            if not label or depth == len(path):
                break
            node = path[depth]  # the target's token is the drafter's: the chain goes on through that node
        return tuple(tokens)

    # -- gated: trust or doubt each drafted token ---------------------------------------

    def _run_gated(self, max_frame_tokens: int) -> None:
        """Emit what the gate trusts; have the cloud verify from the first token it doubts."""
        gate = self.decoder.gate
        assert gate is not None
        every = self.decoder.config.gate_check_every
        # Trusted tokens ride along as committed ids; a frame carries at most this many.
        self.max_committed = max(1, max_frame_tokens or 32)
        self.cloud_length = len(self.committed)  # tokens the cloud holds (or will, once its frame is judged)
        self.checked_length = len(self.committed)  # end of the last verified block
        self.trusted_features: list[np.ndarray] = []  # of committed tokens not yet sent (when logging)
        while self.finish_reason is None:
            if len(self.committed) >= self.session_limit:
                # Trusted tokens not yet sent become part of the next session's prompt (unlabelled).
                if self._renew_verify():
                    self.trusted_features = []
                    self.cloud_length = self.checked_length = len(self.committed)
                    continue
                self.finish_reason = "length"
                break
            assert self.stream is not None
            self._gated_round(self.stream, gate, every)

    def _gated_round(self, stream: DecodeStream, gate: TrustGate, every: int) -> None:
        """Trust tokens one by one until the gate doubts one or a check is due, then verify a block."""
        self._sync_drafter(self.committed)
        start = time.perf_counter()
        logits, hidden = self.drafter.extend(self.committed[self.drafter.length :])
        row, hidden_row = logits[-1], hidden[-1]
        self.stats.draft_s += time.perf_counter() - start
        while True:
            unsent = len(self.committed) - self.cloud_length
            if unsent >= self.max_committed:  # the frame limit: send the trusted tokens alone (labels only)
                self._send_gated(stream, _Block(ids=[], dists=[], features=None, ends_with_eos=False), True)
                return
            since_check = len(self.committed) - self.checked_length
            start = time.perf_counter()
            features = gate.features(row, hidden_row, since_check)
            trusted = not (every and since_check >= every) and gate.trusts(features)
            self.stats.gate_s += time.perf_counter() - start
            if not trusted:
                break
            start = time.perf_counter()
            token = self._pick_local(row, len(self.committed))
            self.stats.draft_s += time.perf_counter() - start
            if self.decoder.log is not None:
                self.trusted_features.append(features[0])
            self.stats.num_trusted += 1
            self._emit([token])
            if self.finish_reason is not None or len(self.committed) >= self.session_limit:
                return  # the generation (or the session) ended on trusted tokens; they are never sent
            start = time.perf_counter()
            logits, hidden = self.drafter.extend([token])
            row, hidden_row = logits[-1], hidden[-1]
            self.stats.draft_s += time.perf_counter() - start
        room = self.session_limit - len(self.committed)
        block = self._draft(self.committed, min(self.max_draft, room), since_check, first=(row, hidden_row))
        self._send_gated(stream, block, expects_continuation=False)  # not pipelined: the verdict brings the bonus

    def _send_gated(self, stream: DecodeStream, block: _Block, expects_continuation: bool) -> None:
        """Send the unsent trusted tokens as committed plus ``block``, and apply the verdict."""
        committed_ids = tuple(self.committed[self.cloud_length :])
        committed_features = np.stack(self.trusted_features) if self.trusted_features else None
        self._send(self.cloud_length, block, expects_continuation, committed_ids, committed_features)
        self.trusted_features = []
        self._await_verdict(stream)
        if block.ids:
            self.checked_length = len(self.committed)
        self.cloud_length = len(self.committed)

    # -- local --------------------------------------------------------------------------

    def _run_local(self) -> None:
        """Drafter-only decoding from the committed sequence."""
        if self.stats.mode_used is None:
            self.stats.mode_used = "local"
        self._sync_drafter(self.committed)
        while self.finish_reason is None:
            if len(self.committed) >= self.limit:
                self.finish_reason = "length"
                break
            start = time.perf_counter()
            logits, _ = self.drafter.extend(self.committed[self.drafter.length :])
            token = self._pick_local(logits[-1], len(self.committed))
            self.stats.draft_s += time.perf_counter() - start
            self.stats.num_local_tokens += 1
            self._emit([token])

    def _pick_local(self, logits: np.ndarray, position: int) -> int:
        if self.sampling.is_greedy:
            return int(np.argmax(logits))
        ids, probs = local_distribution(logits, self.sampling)
        return int(ids[sample_dense(probs, seeded_rng(self.sampling.seed, position, _DRAFT_STREAM))])

    # -- output ---------------------------------------------------------------------------

    def _emit(self, ids: list[int]) -> None:
        """Append tokens to the committed sequence, stopping at EOS, a stop string or the limit."""
        emitted: list[int] = []
        for token in ids:
            if self.finish_reason is not None:
                break
            self.committed.append(token)
            emitted.append(token)
            if self.text.push(token) or token in self.eos:
                self.finish_reason = "stop"
            elif len(self.committed) >= self.prompt_length + self.request.max_new_tokens:
                self.finish_reason = "length"
        if emitted and self.on_tokens is not None:
            self.on_tokens(emitted, self.text.take_delta(final=self.finish_reason is not None))


def branch_fits(costs: Costs, length: int, spent_s: float = 0.0) -> bool:
    """Whether drafting one more branch of ``length`` tokens, after ``spent_s`` on this verdict's
    branches, stays within the link's round trip (what a hit saves; the verifier's wait for a
    batch is not part of it, :attr:`~tandemspec.edge.autodraft.Costs.link_rtt_s`)."""
    return spent_s + length * costs.draft_s_per_token <= costs.link_rtt_s


def _runner_up(logits: np.ndarray, token: int) -> tuple[float, int, float]:
    """(log-prob of ``token``, the likeliest other token, its log-prob) under the drafter's logits."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    log_z = float(np.log(np.sum(np.exp(shifted))))
    masked = shifted.copy()
    masked[token] = -np.inf
    runner = int(np.argmax(masked))
    return float(shifted[token]) - log_z, runner, float(shifted[runner]) - log_z
