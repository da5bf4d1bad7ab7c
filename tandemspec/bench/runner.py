"""The bench run: every mode over the same prompts, interleaved, through the link emulator.

For each link setting (round-trip delay) the runner walks the prompts once; for each
prompt it runs every mode in turn (``cloud``, ``local``, ``lossless-sync``, ``lossless``),
so slow drift of a shared machine hits all modes alike. Each run records the generated
ids, the decoder's statistics, the verifier's pass counts and when each token reached the
app (``on_tokens``). The load test then runs N edges at once against the one verifier.
Scoring and figures live in :mod:`tandemspec.bench.scoring` and :mod:`tandemspec.bench.figures`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemspec.bench.link import LinkConfig, LinkThread
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, DecodeStream, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
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
    unavailable: str = ""  # why the mode cannot run yet ("" = it can)


# The registry of modes, in the interleaving order. A new mode (gated operating points)
# is one more entry here.
MODES: tuple[BenchMode, ...] = (
    BenchMode("cloud", "cloud"),
    BenchMode("local", "local"),
    BenchMode("lossless-sync", "lossless", pipeline=False),
    BenchMode("lossless", "lossless", pipeline=True),
    BenchMode("gated", "gated", unavailable="needs the uncertainty gate, which the edge does not have yet"),
)
BASELINE_MODE = "cloud"
DRAFTER_MODE = "local"


def find_mode(name: str) -> BenchMode:
    """The registered mode called ``name``; raises ``ValueError`` for an unknown name."""
    for mode in MODES:
        if mode.name == name:
            return mode
    raise ValueError(f"unknown mode {name!r}; known: {', '.join(m.name for m in MODES)}")


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the pair, prompts, link settings, loads and sizes."""

    target_dir: Path
    drafter_dir: Path  # Hugging Face drafter (assisted-generation reference)
    bundle_dir: Path  # the edge bundle of the same drafter
    prompts: tuple[str, ...]
    modes: tuple[str, ...] = ("cloud", "local", "lossless-sync", "lossless")
    rtts_ms: tuple[float, ...] = (0.0, 20.0, 80.0)
    concurrency: tuple[int, ...] = (1, 4, 16)
    load_modes: tuple[str, ...] = ("cloud", "lossless")
    generations_per_edge: int = 2  # per edge in the load test
    max_new_tokens: int = 64
    draft_length: int = 4
    num_assisted_prompts: int = 4  # 0 = skip the transformers reference
    drafter_threads: int = 1  # ONNX Runtime intra-op threads per edge

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts")
        if not self.rtts_ms or not self.concurrency:
            raise ValueError("need at least one RTT and one concurrency level")
        if min(self.concurrency) < 1 or self.max_new_tokens < 1 or self.generations_per_edge < 1:
            raise ValueError("concurrency, max_new_tokens and generations_per_edge must be >= 1")
        for name in (*self.modes, *self.load_modes):
            find_mode(name)


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
    """One emulated device: a drafter, tokenizer, client and a decoder per pipelining setting."""

    tokenizer: EdgeTokenizer
    client: RecordingClient
    decoders: dict[bool, HybridDecoder] = field(default_factory=dict)

    def close(self) -> None:
        self.client.close()


def build_edge(config: BenchConfig, address: str) -> Edge:
    """An edge talking to ``address`` (the link proxy), with warm drafter sessions."""
    bundle = load_bundle(config.bundle_dir)
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=config.drafter_threads))
    client = RecordingClient(ClientConfig(address=address, recv_timeout_s=60.0))
    edge = Edge(tokenizer, client)
    for pipeline in (False, True):
        decoder_config = DecoderConfig(draft_length=config.draft_length, pipeline=pipeline)
        edge.decoders[pipeline] = HybridDecoder(drafter, tokenizer, client, decoder_config)
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
    result = edge.decoders[mode.pipeline].generate(request, on_tokens)
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
    config: BenchConfig, server: ServerHandle, link: LinkThread, encoded: Sequence[tuple[int, ...]], progress: Progress
) -> list[PromptRun]:
    """Every runnable mode at every RTT over every prompt, interleaved per prompt."""
    modes = [find_mode(name) for name in config.modes if not find_mode(name).unavailable]
    edge = build_edge(config, link.address)
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
    for concurrency in config.concurrency:
        edges = [build_edge(config, link.address) for _ in range(concurrency)]
        try:
            for name in config.load_modes:
                mode = find_mode(name)
                if mode.unavailable:
                    continue
                for edge in edges:
                    warm_up(edge, [mode], encoded[0])
                runs.append(run_load_once(edges, mode, rtt_ms, encoded, config, server))
                progress(f"load: {concurrency} edges, {name}: {runs[-1].tokens_per_s:.1f} tokens/s")
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
