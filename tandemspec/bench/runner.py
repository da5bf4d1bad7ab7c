"""The bench run: every mode over the same prompts, interleaved, through the link emulator.

For each link setting (round-trip delay) the runner walks the prompts once; for each
prompt it runs every mode in turn (``cloud``, ``local``, ``lossless-sync``, ``lossless``,
``lossless-defer``, ``lossless-nobranch``, ``lossless-sync-auto`` and ``lossless-auto`` when
asked for (pipelined with the bonus deferred, the behaviour before the bonus rule; pipelined
without branch frames, as before them; chains whose length is chosen from the measured
costs: docs/trees.md), then one ``gated-KIND@Q`` mode per gate kind and
quality floor, one ``lossless-sync-kN`` chain per extra draft length, ``lossless-sync-treeN``
and ``lossless-treeN`` per tree budget, and ``tree-sync-auto`` and ``tree-auto`` (trees whose
budget is chosen from the measured costs, up to the largest tree budget), so slow drift of a
shared machine hits all modes alike. Each run records the generated ids, the decoder's statistics, the verifier's pass
counts and when each token reached the app (``on_tokens``). The load test then runs N edges
at once against the one verifier.
Scoring and figures live in :mod:`tandemspec.bench.scoring` and :mod:`tandemspec.bench.figures`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemspec.bench.link import LinkConfig, LinkThread
from tandemspec.cloud.config import DeviceChoice, DtypeChoice
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, DecodeStream, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.gate import GATE_KINDS, GateChoice, GateKind, TrustGate
from tandemspec.edge.stats import GenerationResult
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.types import DecodeMode, SamplingParams

if TYPE_CHECKING:
    from tandemspec.cloud.server import ServerHandle

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchMode:
    """One way to decode that the bench compares: a decoder mode plus its options."""

    name: str
    decode_mode: DecodeMode
    pipeline: bool = True
    gate: GateChoice | None = None  # gated operating points: the score and its quality floor
    draft_length: int | None = None  # chains: None = the bench's draft length
    tree_budget: int = 0  # draft trees of this many tokens per frame (0 = chains)
    keep_bonus: bool = True  # pipelined greedy frames keep their bonus (False: deferred, as before)
    # each frame's length (chains) or budget (up to tree_budget) chosen from the measured costs
    auto_draft: bool = False
    branches: int = DecoderConfig.branches  # pipelined greedy chains: branch frames per awaited verdict


# The registry of fixed modes, in the interleaving order.
MODES: tuple[BenchMode, ...] = (
    BenchMode("cloud", "cloud"),
    BenchMode("local", "local"),
    BenchMode("lossless-sync", "lossless", pipeline=False),
    BenchMode("lossless", "lossless", pipeline=True),
    BenchMode("lossless-defer", "lossless", pipeline=True, keep_bonus=False),
    BenchMode("lossless-sync-auto", "lossless", pipeline=False, auto_draft=True),
    BenchMode("lossless-auto", "lossless", pipeline=True, auto_draft=True),
    BenchMode("lossless-nobranch", "lossless", pipeline=True, branches=0),
)
# Families, not modes: one bench mode per (gate kind, quality floor), see gated_modes; per
# extra chain draft length, see chain_modes; per tree budget, see tree_modes.
GATED_FAMILY = "gated"
CHAIN_FAMILY = "chain"
TREE_FAMILY = "tree"
# --auto-draft trees up to the largest tree budget, synchronous and pipelined (sized by --tree-budget too)
AUTO_TREE_MODES = ("tree-sync-auto", "tree-auto")
MODE_NAMES: tuple[str, ...] = (*(m.name for m in MODES), GATED_FAMILY, CHAIN_FAMILY, TREE_FAMILY, *AUTO_TREE_MODES)
BASELINE_MODE = "cloud"
DRAFTER_MODE = "local"


def find_mode(name: str) -> BenchMode:
    """The registered fixed mode called ``name``; raises ``ValueError`` for an unknown name."""
    for mode in MODES:
        if mode.name == name:
            return mode
    raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODE_NAMES)}")


def gated_mode_name(kind: str, quality: float) -> str:
    """``gated-learned@0.9``: the bench name of one gated operating point."""
    return f"{GATED_FAMILY}-{kind}@{quality:g}"


def gated_modes(kinds: Sequence[GateKind], qualities: Sequence[float]) -> tuple[BenchMode, ...]:
    """One gated mode per (kind, quality floor), kind-major (not pipelined: gated mode never is)."""
    return tuple(
        BenchMode(gated_mode_name(kind, quality), "gated", pipeline=False, gate=GateChoice(kind, quality=quality))
        for kind in dict.fromkeys(kinds)
        for quality in dict.fromkeys(qualities)
    )


def chain_modes(lengths: Sequence[int]) -> tuple[BenchMode, ...]:
    """``lossless-sync-kN``: synchronous lossless chains of N draft tokens (the comparison for trees)."""
    return tuple(
        BenchMode(f"lossless-sync-k{n}", "lossless", pipeline=False, draft_length=n) for n in dict.fromkeys(lengths)
    )


def tree_modes(budgets: Sequence[int]) -> tuple[BenchMode, ...]:
    """Per budget N, lossless decoding with draft trees of N tokens per frame: ``lossless-sync-treeN``
    (each frame waits for the verdict before it) and ``lossless-treeN`` (pipelined, as ``lossless``)."""
    return tuple(
        BenchMode(f"lossless{'' if pipeline else '-sync'}-tree{n}", "lossless", pipeline=pipeline, tree_budget=n)
        for n in dict.fromkeys(budgets)
        for pipeline in (False, True)
    )


def auto_tree_mode(name: str, budgets: Sequence[int]) -> BenchMode:
    """``tree-sync-auto`` / ``tree-auto``: each frame's tree budget chosen from the measured costs,
    up to the largest of ``budgets`` (docs/trees.md)."""
    return BenchMode(name, "lossless", pipeline=name == "tree-auto", tree_budget=max(budgets), auto_draft=True)


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the pair, prompts, link settings, loads and sizes."""

    target_dir: Path
    drafter_dir: Path  # Hugging Face drafter (assisted-generation reference)
    bundle_dir: Path  # the edge bundle of the same drafter
    prompts: tuple[str, ...]
    modes: tuple[str, ...] = ("cloud", "local", "lossless-sync", "lossless", GATED_FAMILY)
    rtts_ms: tuple[float, ...] = (0.0, 20.0, 80.0)
    concurrency: tuple[int, ...] = (1, 4, 16)
    load_modes: tuple[str, ...] = ("cloud", "lossless")
    generations_per_edge: int = 2  # per edge in the load test
    max_new_tokens: int = 64
    draft_length: int = 4
    num_assisted_prompts: int = 4  # 0 = skip the transformers reference
    drafter_threads: int = 1  # ONNX Runtime intra-op threads per edge
    gate_kinds: tuple[GateKind, ...] = GATE_KINDS  # the learned gate and the two baselines
    # quality floors: the share of would-be-rejected tokens each point must catch on held-out logs
    gate_qualities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
    gate_check_every: int = 16  # gated: verify at least every N tokens (0 = only doubted ones)
    chain_lengths: tuple[int, ...] = ()  # the chain family: one synchronous chain per draft length
    tree_budgets: tuple[int, ...] = ()  # the tree family: one tree mode per budget
    # the verifier's device and dtype, as `tandem cloud serve` takes them (auto: CUDA in bfloat16 when present)
    target_device: DeviceChoice = "auto"
    target_dtype: DtypeChoice = "auto"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts")
        if not self.rtts_ms or not self.concurrency:
            raise ValueError("need at least one RTT and one concurrency level")
        if min(self.concurrency) < 1 or self.max_new_tokens < 1 or self.generations_per_edge < 1:
            raise ValueError("concurrency, max_new_tokens and generations_per_edge must be >= 1")
        for name in self.modes:
            if name not in MODE_NAMES:
                raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODE_NAMES)}")
        for name in self.load_modes:
            find_mode(name)  # the load test runs fixed modes only
        for kind in self.gate_kinds:
            GateChoice(kind)  # refuses an unknown kind
        if any(not 0.0 <= q <= 1.0 for q in self.gate_qualities):
            raise ValueError(f"gate quality floors must be in [0, 1], got {self.gate_qualities}")
        if GATED_FAMILY in self.modes and not (self.gate_kinds and self.gate_qualities):
            raise ValueError("gated mode needs at least one gate kind and one quality floor")
        if self.gate_check_every < 0:
            raise ValueError(f"gate_check_every must be >= 0, got {self.gate_check_every}")
        if set(AUTO_TREE_MODES) & set(self.modes) and not self.tree_budgets:
            raise ValueError(f"{', '.join(AUTO_TREE_MODES)} need the largest tree budget (--tree-budget)")
        for family, sizes in ((CHAIN_FAMILY, self.chain_lengths), (TREE_FAMILY, self.tree_budgets)):
            if family in self.modes and not sizes:
                raise ValueError(f"the {family} modes need at least one size (--chain-lengths / --tree-budget)")
            if any(n < 1 for n in sizes):
                raise ValueError(f"{family} sizes must be >= 1, got {sizes}")


@dataclass(frozen=True)
class GatedPoint:
    """A gated operating point as the bench ran it: the score, its quality floor, the resolved threshold."""

    mode: str
    kind: GateKind
    quality: float
    threshold: float  # on the score's own scale (p_accept, top-1 probability, entropy in nats)


@dataclass(frozen=True)
class ModePlan:
    """The modes a bench runs, in interleaving order, with the trust gates of the gated ones."""

    modes: tuple[BenchMode, ...]
    gates: dict[str, TrustGate]  # by mode name
    gated_points: tuple[GatedPoint, ...]
    skipped: dict[str, str]  # mode or family -> why it did not run


def plan_modes(config: BenchConfig, gate_path: Path | None) -> ModePlan:
    """Expand ``gated`` into its operating points and load their gates (``gate_path``: the bundle's gate.onnx).

    When the gates cannot be built (no gate in the bundle, no operating curves in its
    gate.json) the whole gated family is skipped with the reason; the other modes still run.
    """
    modes: list[BenchMode] = []
    gates: dict[str, TrustGate] = {}
    points: list[GatedPoint] = []
    skipped: dict[str, str] = {}
    for name in config.modes:
        if name == CHAIN_FAMILY:
            modes.extend(chain_modes(config.chain_lengths))
            continue
        if name == TREE_FAMILY:
            modes.extend(tree_modes(config.tree_budgets))
            continue
        if name in AUTO_TREE_MODES:
            modes.append(auto_tree_mode(name, config.tree_budgets))
            continue
        if name != GATED_FAMILY:
            modes.append(find_mode(name))
            continue
        family = gated_modes(config.gate_kinds, config.gate_qualities)
        try:
            built = {mode.name: build_trust_gate(mode, gate_path) for mode in family}
        except ValueError as error:
            logger.warning("skipping gated mode: %s", error)
            skipped[GATED_FAMILY] = str(error)
            continue
        modes.extend(family)
        gates.update(built)
        for mode in family:
            assert mode.gate is not None and mode.gate.quality is not None  # gated_modes sets both
            points.append(GatedPoint(mode.name, mode.gate.kind, mode.gate.quality, built[mode.name].threshold))
    return ModePlan(tuple(modes), gates, tuple(points), skipped)


def build_trust_gate(mode: BenchMode, gate_path: Path | None) -> TrustGate:
    """The trust gate of one gated mode; ``ValueError`` when the bundle cannot provide it."""
    assert mode.gate is not None
    if gate_path is None:
        raise ValueError("the edge bundle has no gate (gate.onnx): train one with `tandem gate train --out BUNDLE`")
    try:
        return TrustGate.from_choice(mode.gate, gate_path)
    except ValueError as error:
        raise ValueError(f"{mode.name}: {error}") from error


@dataclass(frozen=True)
class PromptRun:
    """One generation of one prompt in one mode at one link setting."""

    mode: str
    rtt_ms: float
    prompt_index: int
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    stats: dict[str, Any]
    ttft_s: float  # request start to the first token reaching the app
    tpot_s: float  # mean time between later tokens (0 when fewer than two tokens)
    messages_up: int
    messages_down: int
    server_step_passes: float
    server_prefill_passes: float


@dataclass(frozen=True)
class LoadRun:
    """N edges generating at once in one mode: what the verifier served."""

    mode: str
    concurrency: int
    rtt_ms: float
    num_generations: int
    num_tokens: int
    wall_s: float
    tokens_per_s: float
    mean_batch_rows: float  # session-steps per target step pass
    num_fell_back: int


class RecordingClient(VerifierClient):
    """A verifier client that keeps the streams it opens, to count their messages."""

    def __init__(self, config: ClientConfig) -> None:
        super().__init__(config)
        self.streams: list[DecodeStream] = []

    def open_stream(self) -> DecodeStream:
        stream = super().open_stream()
        self.streams.append(stream)
        return stream


@dataclass
class Edge:
    """One emulated device: a drafter, tokenizer and client shared by one decoder per mode."""

    tokenizer: EdgeTokenizer
    client: RecordingClient
    decoders: dict[str, HybridDecoder] = field(default_factory=dict)  # by mode name

    def close(self) -> None:
        self.client.close()


def build_edge(
    config: BenchConfig, address: str, modes: Sequence[BenchMode], gates: Mapping[str, TrustGate] | None = None
) -> Edge:
    """An edge talking to ``address`` (the link proxy) with a decoder for each of ``modes``.

    ``gates``: the trust gate of each gated mode, by name (shared between edges: a gate
    holds no per-generation state and ONNX Runtime sessions may run concurrently).
    """
    bundle = load_bundle(config.bundle_dir)
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=config.drafter_threads))
    client = RecordingClient(ClientConfig(address=address, recv_timeout_s=60.0))
    edge = Edge(tokenizer, client)
    gates = gates or {}
    for mode in modes:
        decoder_config = DecoderConfig(
            mode=mode.decode_mode,
            draft_length=mode.draft_length or config.draft_length,
            pipeline=mode.pipeline,
            tree_budget=mode.tree_budget,
            gate_check_every=config.gate_check_every,
            keep_bonus=mode.keep_bonus,
            auto_draft=mode.auto_draft,
            branches=mode.branches,
        )
        gate = gates.get(mode.name)
        if mode.gate is not None and gate is None:
            raise ValueError(f"{mode.name} needs its trust gate")
        edge.decoders[mode.name] = HybridDecoder(drafter, tokenizer, client, decoder_config, gate=gate)
    return edge


def generate_once(
    edge: Edge, mode: BenchMode, prompt_ids: tuple[int, ...], max_new_tokens: int
) -> tuple[GenerationResult, list[float], int, int]:
    """(result, arrival time of every token, messages up, messages down) of one greedy generation."""
    arrivals: list[float] = []

    def on_tokens(ids: list[int], text: str) -> None:
        now = time.perf_counter()
        arrivals.extend([now] * len(ids))

    num_streams = len(edge.client.streams)
    request = GenerationRequest(prompt_ids, SamplingParams(), max_new_tokens, mode=mode.decode_mode)
    start = time.perf_counter()
    result = edge.decoders[mode.name].generate(request, on_tokens)
    streams = edge.client.streams[num_streams:]
    del edge.client.streams[num_streams:]  # keep the list short over a long run
    offsets = [t - start for t in arrivals]
    return result, offsets, sum(s.frames_up for s in streams), sum(s.frames_down for s in streams)


def token_timing(offsets: Sequence[float]) -> tuple[float, float]:
    """(TTFT, mean time per later token) from each token's arrival offset."""
    if not offsets:
        return 0.0, 0.0
    if len(offsets) < 2:
        return offsets[0], 0.0
    return offsets[0], (offsets[-1] - offsets[0]) / (len(offsets) - 1)


def run_one(
    edge: Edge,
    mode: BenchMode,
    rtt_ms: float,
    index: int,
    prompt_ids: tuple[int, ...],
    config: BenchConfig,
    server: ServerHandle,
) -> PromptRun:
    """Generate one prompt in one mode and record what it cost."""
    before = server.metrics.snapshot()
    result, offsets, up, down = generate_once(edge, mode, prompt_ids, config.max_new_tokens)
    after = server.metrics.snapshot()
    ttft_s, tpot_s = token_timing(offsets)
    return PromptRun(
        mode=mode.name,
        rtt_ms=rtt_ms,
        prompt_index=index,
        prompt_ids=prompt_ids,
        token_ids=result.token_ids,
        stats=result.stats.to_dict(),
        ttft_s=ttft_s,
        tpot_s=tpot_s,
        messages_up=up,
        messages_down=down,
        server_step_passes=after["step_passes"] - before["step_passes"],
        server_prefill_passes=after["prefill_passes"] - before["prefill_passes"],
    )


def warm_up(edge: Edge, modes: Sequence[BenchMode], prompt_ids: tuple[int, ...]) -> None:
    """One short generation per mode: connect, fill caches, load kernels before timing."""
    for mode in modes:
        generate_once(edge, mode, prompt_ids, 4)


def run_modes(
    config: BenchConfig,
    plan: ModePlan,
    server: ServerHandle,
    link: LinkThread,
    encoded: Sequence[tuple[int, ...]],
    progress: Progress,
) -> list[PromptRun]:
    """Every planned mode at every RTT over every prompt, interleaved per prompt."""
    modes = plan.modes
    edge = build_edge(config, link.address, modes, plan.gates)
    runs: list[PromptRun] = []
    try:
        warm_up(edge, modes, encoded[0])
        for rtt_ms in config.rtts_ms:
            link.set_link(LinkConfig(rtt_ms=rtt_ms))
            for index, prompt_ids in enumerate(encoded):
                for mode in modes:
                    run = run_one(edge, mode, rtt_ms, index, prompt_ids, config, server)
                    runs.append(run)
                    if run.stats["fell_back_to_local"]:
                        logger.warning("%s fell back to local: %s", mode.name, run.stats["fallback_reason"])
                progress(f"rtt {rtt_ms:g} ms: prompt {index + 1}/{len(encoded)} done in {len(modes)} modes")
    finally:
        edge.close()
    return runs


def _edge_worker(
    edge: Edge,
    mode: BenchMode,
    prompts: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    start: threading.Barrier,
    out: list[GenerationResult],
) -> None:
    """Wait for the others, then generate ``prompts`` one after another."""
    start.wait()
    try:
        for prompt_ids in prompts:
            out.append(generate_once(edge, mode, prompt_ids, max_new_tokens)[0])
    except Exception:  # a thread's error would vanish: log it, the run reports fewer generations
        logger.exception("a bench edge failed")


def run_load(
    config: BenchConfig, server: ServerHandle, link: LinkThread, encoded: Sequence[tuple[int, ...]], progress: Progress
) -> list[LoadRun]:
    """N concurrent edges per load mode, at the first RTT setting, interleaved per N."""
    rtt_ms = config.rtts_ms[0]
    link.set_link(LinkConfig(rtt_ms=rtt_ms))
    runs: list[LoadRun] = []
    modes = [find_mode(name) for name in config.load_modes]
    for concurrency in config.concurrency:
        edges = [build_edge(config, link.address, modes) for _ in range(concurrency)]
        try:
            for mode in modes:
                for edge in edges:
                    warm_up(edge, [mode], encoded[0])
                runs.append(run_load_once(edges, mode, rtt_ms, encoded, config, server))
                progress(f"load: {concurrency} edges, {mode.name}: {runs[-1].tokens_per_s:.1f} tokens/s")
        finally:
            for edge in edges:
                edge.close()
    return runs


def run_load_once(
    edges: Sequence[Edge],
    mode: BenchMode,
    rtt_ms: float,
    encoded: Sequence[tuple[int, ...]],
    config: BenchConfig,
    server: ServerHandle,
) -> LoadRun:
    """All ``edges`` generate ``generations_per_edge`` prompts each, started together."""
    per_edge = config.generations_per_edge
    barrier = threading.Barrier(len(edges) + 1)
    outputs: list[list[GenerationResult]] = [[] for _ in edges]
    threads = []
    for i, edge in enumerate(edges):
        prompts = [encoded[(i * per_edge + j) % len(encoded)] for j in range(per_edge)]
        args = (edge, mode, prompts, config.max_new_tokens, barrier, outputs[i])
        threads.append(threading.Thread(target=_edge_worker, args=args, name=f"bench-edge-{i}", daemon=True))
    for thread in threads:
        thread.start()
    before = server.metrics.snapshot()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    after = server.metrics.snapshot()
    results = [result for out in outputs for result in out]
    num_tokens = sum(len(r.token_ids) for r in results)
    step_passes = after["step_passes"] - before["step_passes"]
    return LoadRun(
        mode=mode.name,
        concurrency=len(edges),
        rtt_ms=rtt_ms,
        num_generations=len(results),
        num_tokens=num_tokens,
        wall_s=wall_s,
        tokens_per_s=num_tokens / wall_s if wall_s > 0 else 0.0,
        mean_batch_rows=(after["batched_rows"] - before["batched_rows"]) / step_passes if step_passes else 0.0,
        num_fell_back=sum(bool(r.stats.fell_back_to_local) for r in results),
    )
