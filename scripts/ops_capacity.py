"""Tokens/s served by 1, 2, 3 verifier replicas, with no drafting on the machine during the measurement.

The edges' drafting is taken off the verifiers' cores by doing it beforehand: for each
prompt the target's greedy continuation is computed (transformers), and the reference
drafter's greedy draft at every committed position of it (ONNX Runtime), so the whole
sequence of draft frames a real lossless edge would send is known. During the measurement
``--sessions`` replaying clients (grpc.aio, one process, pinned to ``--client-cpus``) send
those frames and check every verdict against the expected committed length; the replicas
(``tandem cloud serve``, one torch thread each, pinned to ``--verifier-cpus`` when given)
do all the model work. Tokens served = committed tokens per second of wall time.

    python scripts/ops_capacity.py --replicas 1,2,3 --sessions 16 --duration-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from ops_replicas import Replica

from tandemspec.bench.prompts import load_prompts
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.pool import channel_options, channel_target
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.fingerprint import tokenizer_fingerprint
from tandemspec.models import reference_dir
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2_grpc as pb_grpc
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen, SessionReady, Verdict


@dataclass(frozen=True)
class Script:
    """One generation's frames: (committed tokens before it, draft ids, committed tokens after its verdict)."""

    prompt_ids: tuple[int, ...]
    frames: tuple[tuple[int, tuple[int, ...], int], ...]
    num_tokens: int


def pre_draft(num_prompts: int, max_new: int, draft_length: int) -> list[Script]:
    """The frames a lossless greedy edge sends for each prompt: drafts along the target's own path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    target = AutoModelForCausalLM.from_pretrained(reference_dir() / "target", dtype=torch.float32).eval()
    bundle = load_bundle(reference_dir() / "edge")
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    drafter = HybridDecoder(
        OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1)), tokenizer, None, DecoderConfig(mode="local")
    )
    scripts = []
    for prompt in load_prompts()[:num_prompts]:
        ids = tokenizer.encode_prompt(prompt)
        with torch.no_grad():
            out = target.generate(torch.tensor([ids]), max_new_tokens=max_new + draft_length + 1, do_sample=False)
        path = tuple(int(t) for t in out[0, len(ids) :])
        frames, done = [], 0
        while done < min(max_new, len(path) - draft_length - 1):  # an end of text cuts the path short
            draft = drafter.generate(GenerationRequest(prompt_ids=ids + path[:done], max_new_tokens=draft_length))
            accepted = next((i for i, t in enumerate(draft.token_ids) if t != path[done + i]), len(draft.token_ids))
            frames.append((done, draft.token_ids, done + accepted + 1))
            done += accepted + 1
        scripts.append(Script(ids, tuple(frames), done))
    return scripts


async def replay(channel: grpc.aio.Channel, script: Script, fingerprint: str) -> int:
    """Send one generation's frames, check each verdict; returns the tokens committed."""
    call = pb_grpc.VerifierStub(channel).Decode(timeout=120)
    opening = SessionOpen(script.prompt_ids, SamplingParams(), script.num_tokens + 8, tokenizer_fingerprint=fingerprint)
    await call.write(codec.encode_edge_frame(opening))
    assert isinstance(codec.decode_cloud_frame(await call.read()), SessionReady)
    base, epoch = len(script.prompt_ids), 0
    for seq, (done, draft, after) in enumerate(script.frames):
        await call.write(codec.encode_edge_frame(DraftFrame(seq, epoch, base + done, draft_ids=draft)))
        verdict = codec.decode_cloud_frame(await call.read())
        if not isinstance(verdict, Verdict) or verdict.committed_length != base + after:
            raise RuntimeError(f"verdict {verdict} does not follow the target's greedy path (expected {base + after})")
        epoch = verdict.epoch
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    return script.frames[-1][2]


async def load(address: str, scripts: list[Script], sessions: int, duration_s: float, fingerprint: str) -> int:
    """``sessions`` clients replaying back to back until ``duration_s``; returns tokens committed."""
    deadline = time.monotonic() + duration_s
    options = channel_options()
    async with grpc.aio.insecure_channel(channel_target(address), options=options) as channel:

        async def client(index: int) -> int:
            tokens, turn = 0, index
            while time.monotonic() < deadline:
                tokens += await replay(channel, scripts[turn % len(scripts)], fingerprint)
                turn += 1
            return tokens

        return sum(await asyncio.gather(*(client(i) for i in range(sessions))))


def measure(args: argparse.Namespace, num_replicas: int, scripts: list[Script], fingerprint: str) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(args.verifier_threads)  # torch intra-op threads of each replica
    extra = ("--max-sessions", str(max(64, args.sessions)))
    replicas = [Replica(reference_dir() / "target", extra, taskset=args.verifier_cpus) for _ in range(num_replicas)]
    try:
        for replica in replicas:
            replica.start()
        address = ",".join(r.address for r in replicas)
        asyncio.run(load(address, scripts, num_replicas, 2.0, fingerprint))  # warm-up: every replica once
        before = [r.counters() for r in replicas]
        started = time.monotonic()
        tokens = asyncio.run(load(address, scripts, args.sessions, args.duration_s, fingerprint))
        wall_s = time.monotonic() - started
        after = [r.counters() for r in replicas]
    finally:
        for replica in replicas:
            replica.stop()
    sessions = [
        sum(v for k, v in a.items() if k.startswith("sessions_total"))
        - sum(v for k, v in b.items() if k.startswith("sessions_total"))
        for a, b in zip(after, before, strict=True)
    ]
    return {
        "replicas": num_replicas,
        "tokens": tokens,
        "wall_s": round(wall_s, 1),
        "tokens_per_s": round(tokens / wall_s, 1),
        "sessions_per_replica": sessions,
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--verifier-threads", type=int, default=1)
    parser.add_argument("--verifier-cpus", help="taskset CPU list for every replica (e.g. 1)")
    parser.add_argument("--client-cpus", help="CPU list for the replaying clients (e.g. 0)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    scripts = pre_draft(args.prompts, args.max_new_tokens, args.draft_length)
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    fingerprint = tokenizer_fingerprint(reference_dir() / "target" / "tokenizer.json")
    rounds = sum(len(s.frames) for s in scripts)
    print(f"pre-drafted {len(scripts)} generations: {sum(s.num_tokens for s in scripts)} tokens in {rounds} frames")
    rows = []
    for n in (int(r) for r in args.replicas.split(",")):
        rows.append(measure(args, n, scripts, fingerprint))
        print(json.dumps(rows[-1]), flush=True)
    command = "python scripts/ops_capacity.py " + " ".join(sys.argv[1:])
    print(f"\n{command}  (cores: {os.cpu_count()}, shared)\n")
    print("| replicas | tokens/s served | sessions per replica | load average (1 min) |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['replicas']} | {r['tokens_per_s']} | {r['sessions_per_replica']} | {r['load_average']:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
