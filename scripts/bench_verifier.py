"""Microbenchmark: verified tokens per second against concurrent sessions, batching on vs off.

Each session opens with its own random prompt and runs rounds of ``--draft-len`` random
draft tokens (greedy; every round verifies ``draft-len`` tokens whatever is accepted, so
the target's work per round is fixed). A verifier runs in-process on loopback; clients are
grpc.aio streams in this process. Prints a Markdown table.

    python scripts/bench_verifier.py --model PATH [--sessions 1,4,16,32] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from tandemspec.cloud.config import CloudConfig, default_model_dir
from tandemspec.cloud.server import serve_in_thread
from tandemspec.cloud.target import TargetModel
from tandemspec.fingerprint import tokenizer_fingerprint
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2_grpc as pb_grpc
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen, SessionReady, Verdict

logger = logging.getLogger("bench_verifier")


@dataclass(frozen=True)
class BenchResult:
    """One (batching, sessions) cell."""

    batching: bool
    num_sessions: int
    verified_tokens: int
    wall_s: float
    mean_batch: float

    @property
    def tokens_per_s(self) -> float:
        return self.verified_tokens / self.wall_s


async def _session(
    address: str, fingerprint: str, prompt: tuple[int, ...], rounds: int, draft_len: int, vocab: int, seed: int
) -> int:
    """One client: ``rounds`` frames of random drafts; returns the draft tokens verified."""
    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.VerifierStub(channel).Decode()
        opening = SessionOpen(
            prompt, SamplingParams(), max_new_tokens=rounds * (draft_len + 1), tokenizer_fingerprint=fingerprint
        )
        await call.write(codec.encode_edge_frame(opening))
        assert isinstance(codec.decode_cloud_frame(await call.read()), SessionReady)
        position, epoch = len(prompt), 0
        for seq in range(rounds):
            draft = tuple(int(t) for t in rng.integers(0, vocab, size=draft_len))
            await call.write(codec.encode_edge_frame(DraftFrame(seq, epoch, position, draft_ids=draft)))
            verdict = codec.decode_cloud_frame(await call.read())
            assert isinstance(verdict, Verdict), verdict
            position, epoch = verdict.committed_length, verdict.epoch
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # the status arrives after the last message
            pass
    return rounds * draft_len


async def _run_clients(address: str, fingerprint: str, num_sessions: int, args: argparse.Namespace, vocab: int) -> int:
    rng = np.random.default_rng(num_sessions)
    prompts = [tuple(int(t) for t in rng.integers(0, vocab, size=args.prompt_len)) for _ in range(num_sessions)]
    counts = await asyncio.gather(
        *(_session(address, fingerprint, p, args.rounds, args.draft_len, vocab, i) for i, p in enumerate(prompts))
    )
    return sum(counts)


def bench_cell(
    target: TargetModel, args: argparse.Namespace, batching: bool, num_sessions: int, fingerprint: str
) -> BenchResult:
    """Serve with one setting and run ``num_sessions`` concurrent clients."""
    config = CloudConfig(
        model_dir=args.model,
        batching=batching,
        batch_window_ms=args.batch_window_ms,
        max_batch_size=max(num_sessions, 1),
        max_sessions=max(num_sessions, 1),
        max_draft_tokens=max(args.draft_len, 1),
    )
    with serve_in_thread(config, target=target) as server:
        asyncio.run(_run_clients(server.address, fingerprint, 1, args, target.vocab_size))  # warm-up
        before = server.metrics.snapshot()
        start = time.perf_counter()
        verified = asyncio.run(_run_clients(server.address, fingerprint, num_sessions, args, target.vocab_size))
        wall = time.perf_counter() - start
        after = server.metrics.snapshot()
    passes = after["step_passes"] - before["step_passes"]
    rows = after["batched_rows"] - before["batched_rows"]
    return BenchResult(batching, num_sessions, verified, wall, rows / passes if passes else 0.0)


def markdown(results: list[BenchResult], sessions: list[int]) -> str:
    """Rows: sessions; columns: tokens/s off and on, speed-up, mean batch."""
    by_key = {(r.batching, r.num_sessions): r for r in results}
    lines = [
        "| sessions | verified tok/s (batching off) | verified tok/s (batching on) | speed-up | mean batch (on) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sessions:
        off, on = by_key[(False, n)], by_key[(True, n)]
        lines.append(
            f"| {n} | {off.tokens_per_s:,.0f} | {on.tokens_per_s:,.0f} | {on.tokens_per_s / off.tokens_per_s:.2f}x "
            f"| {on.mean_batch:.1f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="target folder (HF format)")
    parser.add_argument("--sessions", default="1,4,16,32", help="concurrent sessions to measure")
    parser.add_argument("--rounds", type=int, default=20, help="frames per session")
    parser.add_argument("--draft-len", type=int, default=4, help="draft tokens per frame")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    sessions = [int(s) for s in args.sessions.split(",")]
    target = TargetModel.load(args.model, args.device, args.dtype)
    fingerprint = tokenizer_fingerprint(args.model / "tokenizer.json")
    results = []
    for batching in (False, True):
        for n in sessions:
            result = bench_cell(target, args, batching, n, fingerprint)
            logger.warning("batching=%s sessions=%d: %.0f tok/s", batching, n, result.tokens_per_s)
            results.append(result)
    print(
        f"Target `{args.model}` on {target.device} ({target.dtype_name}); {args.rounds} rounds of "
        f"{args.draft_len} draft tokens per session, batch window {args.batch_window_ms:g} ms.\n"
    )
    print(markdown(results, sessions))


if __name__ == "__main__":
    main()
