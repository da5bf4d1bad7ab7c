"""What every generation reports: counts, bytes on the wire, time split, the mode used."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tandemspec.types import Verdict


class _StreamCounters(Protocol):
    bytes_up: int
    bytes_down: int
    frames_up: int
    frames_down: int
    wait_s: float


@dataclass(frozen=True)
class GenerationStats:
    """Statistics of one generation (all counts cover generated tokens, not the prompt)."""

    mode_requested: str
    mode_used: str  # the mode that produced the last token ("local" after a fallback)
    num_generated: int
    num_rounds: int  # verified draft frames (stale ones excluded)
    num_drafted: int  # draft tokens the target judged
    num_accepted: int
    acceptance_rate: float  # num_accepted / num_drafted
    mean_accepted_length: float  # tokens committed per verified round (accepted + correction/bonus)
    num_target_passes: int  # target forward passes spent on this generation's tokens
    num_cloud_frames: int  # edge frames sent (handshake and close excluded)
    num_stale_frames: int  # pipelined frames discarded after a rejection (or by the bonus rule)
    num_merged_frames: int  # verdicts judged in an earlier frame's target pass (a merged continuation)
    num_bonus_kept: int  # pipelined frames whose bonus came with their verdict instead of being deferred
    num_branch_frames: int  # branches sent: frames drafted on a guessed verdict (DecoderConfig.branches)
    num_branch_hits: int  # branches whose guess came true (the verifier went on without waiting for the edge)
    num_local_tokens: int  # tokens the drafter emitted without verification
    num_trusted: int  # gated mode: tokens emitted on the gate's trust (sent to the cloud as committed)
    cloud_calls_per_token: float
    bytes_up: int  # serialized edge->cloud frames, handshake included
    bytes_down: int  # serialized cloud->edge frames
    bytes_up_per_token: float
    bytes_down_per_token: float
    draft_s: float  # drafter time (ONNX Runtime + sampling)
    gate_s: float  # gated mode: the trust gate's time (features + score)
    network_wait_s: float  # time blocked waiting for the cloud (includes its compute)
    verify_compute_s: float  # the target's compute time, as the verdicts report it
    prefill_ms: float  # the cloud's prompt prefill
    wall_s: float
    fell_back_to_local: bool
    fallback_kind: str  # "" (no switch), "unavailable" (transport loss: backs off) or "busy" (verifier full)
    fallback_reason: str
    fallback_at_token: int  # tokens generated before the switch to local (-1 = no switch)
    num_sessions: int  # verifier sessions used (a request past the verifier's max_new_tokens renews its session)
    bundle_version: str  # the edge bundle that drafted (BundleManifest.version_label)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StatsCounter:
    """Mutable counters of a generation in progress; :meth:`freeze` makes the report."""

    def __init__(self, mode_requested: str, bundle_version: str = "") -> None:
        self.mode_requested = mode_requested
        self.bundle_version = bundle_version
        self.mode_used: str | None = None
        self.num_rounds = 0
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_verified_tokens = 0
        self.num_target_passes = 0
        self.num_cloud_frames = 0
        self.num_stale_frames = 0
        self.num_merged_frames = 0
        self.num_bonus_kept = 0
        self.num_branch_frames = 0
        self.num_branch_hits = 0
        self.num_local_tokens = 0
        self.num_trusted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.draft_s = 0.0
        self.gate_s = 0.0
        self.network_wait_s = 0.0
        self.verify_compute_s = 0.0
        self.prefill_ms = 0.0
        self.wall_s = 0.0
        self.fell_back_to_local = False
        self.fallback_kind = ""
        self.fallback_reason = ""
        self.fallback_at_token = -1
        self.num_sessions = 0

    def add_verdict(self, num_draft: int, verdict: Verdict, num_known: int = 0) -> None:
        """Count one authoritative (non-stale) verdict; ``num_known``: its accepted tokens that an
        earlier verdict already brought (a continuation's root that was that verdict's bonus)."""
        self.num_rounds += 1
        if verdict.shared_pass:
            self.num_merged_frames += 1
        else:
            self.num_target_passes += 1
            self.verify_compute_s += verdict.compute_ms / 1000.0
        self.num_drafted += num_draft
        self.num_accepted += verdict.num_accepted
        self.num_verified_tokens += verdict.num_accepted - num_known + (verdict.next_token is not None)

    def add_stream(self, stream: _StreamCounters) -> None:
        """Add the byte counts and wait time of a finished stream."""
        self.bytes_up += stream.bytes_up
        self.bytes_down += stream.bytes_down
        self.network_wait_s += stream.wait_s

    def freeze(self, num_generated: int) -> GenerationStats:
        per_token = max(num_generated, 1)
        return GenerationStats(
            mode_requested=self.mode_requested,
            mode_used="local" if self.fell_back_to_local else (self.mode_used or "local"),
            num_generated=num_generated,
            num_rounds=self.num_rounds,
            num_drafted=self.num_drafted,
            num_accepted=self.num_accepted,
            acceptance_rate=self.num_accepted / self.num_drafted if self.num_drafted else 0.0,
            mean_accepted_length=self.num_verified_tokens / self.num_rounds if self.num_rounds else 0.0,
            num_target_passes=self.num_target_passes,
            num_cloud_frames=self.num_cloud_frames,
            num_stale_frames=self.num_stale_frames,
            num_merged_frames=self.num_merged_frames,
            num_bonus_kept=self.num_bonus_kept,
            num_branch_frames=self.num_branch_frames,
            num_branch_hits=self.num_branch_hits,
            num_local_tokens=self.num_local_tokens,
            num_trusted=self.num_trusted,
            cloud_calls_per_token=self.num_cloud_frames / per_token,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            bytes_up_per_token=self.bytes_up / per_token,
            bytes_down_per_token=self.bytes_down / per_token,
            draft_s=self.draft_s,
            gate_s=self.gate_s,
            network_wait_s=self.network_wait_s,
            verify_compute_s=self.verify_compute_s,
            prefill_ms=self.prefill_ms,
            wall_s=self.wall_s,
            fell_back_to_local=self.fell_back_to_local,
            fallback_kind=self.fallback_kind,
            fallback_reason=self.fallback_reason,
            fallback_at_token=self.fallback_at_token,
            num_sessions=self.num_sessions,
            bundle_version=self.bundle_version,
        )


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the generated ids (prompt excluded), its text, why it ended, statistics."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats
