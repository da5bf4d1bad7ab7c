"""Merged continuations under load: N edges at once, pipelined lossless chains, one verifier.

    python scripts/measure_merges.py --edges 4 --rtt-ms 20 --prompts P16.jsonl

Each edge generates its share of the prompts (greedy, 48 new tokens, chains of 4) through
the link emulator; prints one JSON line: tokens per target pass as the edges count them,
the frames merged into their predecessor's pass, and the verifier's step passes and rows.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.bench.prompts import load_prompts
from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.stats import GenerationStats
from tandemspec.edge.tokenizer import EdgeTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=Path("models/reference"))
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL, one {'prompt': ...} per line")
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    prompts = load_prompts(args.prompts)
    bundle = load_bundle(args.pair / "edge")
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    stats: list[GenerationStats] = []
    server_config = CloudConfig(model_dir=args.pair / "target", port=0)
    with (
        serve_in_thread(server_config) as server,
        run_in_thread(server.host, server.port, LinkConfig(rtt_ms=args.rtt_ms)) as link,
    ):

        def edge(index: int) -> None:
            drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1))
            client = VerifierClient(ClientConfig(address=link.address, recv_timeout_s=60.0))
            decoder = HybridDecoder(drafter, tokenizer, client, DecoderConfig(pipeline=True, draft_length=4))
            for prompt in prompts[index :: args.edges]:
                request = GenerationRequest(tokenizer.encode_prompt(prompt), max_new_tokens=args.max_new_tokens)
                stats.append(decoder.generate(request).stats)
            client.close()

        threads = [threading.Thread(target=edge, args=(i,)) for i in range(args.edges)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = server.metrics.snapshot()
    tokens = sum(s.num_generated for s in stats)
    passes = sum(s.num_target_passes for s in stats)
    print(
        json.dumps(
            {
                "edges": args.edges,
                "rtt_ms": args.rtt_ms,
                "generations": len(stats),
                "tokens": tokens,
                "rounds": sum(s.num_rounds for s in stats),
                "target_passes": passes,
                "tokens_per_target_pass": tokens / passes,
                "merged_frames": sum(s.num_merged_frames for s in stats),
                "bonus_kept": sum(s.num_bonus_kept for s in stats),
                "server_step_passes": metrics["step_passes"],
                "server_rows": metrics["batched_rows"],
            }
        )
    )


if __name__ == "__main__":
    main()
