"""Measure the edge on the reference pair: lossless with pipelining on vs off, and drafter speed.

Starts ``tandem cloud serve`` on a free loopback port, runs ``tandem edge generate --json``
over the held-out bench prompts in each setting (interleaved, ``--repeats`` times), and
aggregates the per-prompt statistics; then times the drafter per token, one token at a
time with a KV cache, in ONNX Runtime and in eager PyTorch. Prints Markdown.

    python scripts/measure_edge.py [--max-new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tandemspec" / "bench" / "prompts.jsonl"
PAIR = ROOT / "models" / "reference"


def start_cloud() -> tuple[subprocess.Popen[str], str]:
    """A verifier subprocess and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tandemspec.cli", "cloud", "serve", "--model", str(PAIR / "target"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"verifier did not start: {line!r}")
    return process, line.split()[-1]


def run_generate(address: str, max_new_tokens: int, extra: list[str]) -> list[dict[str, float]]:
    """Per-prompt stats of one ``tandem edge generate`` run over the bench prompts."""
    command = [
        sys.executable, "-m", "tandemspec.cli", "edge", "generate", "--cloud", address,
        "--bundle", str(PAIR / "edge"), "--prompts-file", str(PROMPTS),
        "--max-new-tokens", str(max_new_tokens), "--json", *extra,
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line)["stats"] for line in output.splitlines() if line.strip()]


def summarise(stats: list[dict[str, float]]) -> dict[str, float]:
    """Totals over prompts, as ratios per generated token."""
    tokens = sum(s["num_generated"] for s in stats)
    return {
        "prompts": len(stats),
        "tokens": tokens,
        "mean_accepted_length": tokens / sum(s["num_rounds"] for s in stats),
        "drafted_per_token": sum(s["num_drafted"] for s in stats) / tokens,
        "target_passes_per_token": sum(s["num_target_passes"] for s in stats) / tokens,
        "bytes_up_per_token": sum(s["bytes_up"] for s in stats) / tokens,
        "bytes_down_per_token": sum(s["bytes_down"] for s in stats) / tokens,
        "stale_frames_per_token": sum(s["num_stale_frames"] for s in stats) / tokens,
        "ms_per_token": 1000 * sum(s["wall_s"] for s in stats) / tokens,
        "fell_back": sum(bool(s["fell_back_to_local"]) for s in stats),
    }


def drafter_ms_per_token(num_tokens: int = 128) -> dict[str, float]:
    """Incremental decode cost of the drafter: ONNX Runtime vs eager PyTorch (1 token per call)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandemspec.edge.bundle import load_bundle
    from tandemspec.edge.drafter import OnnxDrafter

    ids = list(np.random.default_rng(0).integers(3, 8000, size=num_tokens + 16))
    drafter = OnnxDrafter(load_bundle(PAIR / "edge"))
    drafter.reset(ids[:16])
    started = time.perf_counter()
    for token in ids[16:]:
        drafter.extend([token])
    onnx_ms = 1000 * (time.perf_counter() - started) / num_tokens

    model = AutoModelForCausalLM.from_pretrained(PAIR / "drafter", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids[:16]]), use_cache=True)
        past = out.past_key_values
        started = time.perf_counter()
        for token in ids[16:]:
            past = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True).past_key_values
        torch_ms = 1000 * (time.perf_counter() - started) / num_tokens
    return {"onnxruntime_ms_per_token": onnx_ms, "torch_ms_per_token": torch_ms, "threads": torch.get_num_threads()}


DRAFT_SETTINGS: dict[str, list[str]] = {
    **{f"fixed k={k}": ["--draft-length", str(k)] for k in (2, 3, 4, 5, 6, 8)},
    **{
        f"gate, survival >= {p} (cap 8)": ["--draft-length", "8", "--min-survival", str(p)]
        for p in (0.1, 0.2, 0.3, 0.5)
    },
}


def compare_draft_lengths(max_new_tokens: int, repeats: int) -> None:
    """Fixed draft lengths against the gate-driven one, interleaved in one run (pipelining off)."""
    process, address = start_cloud()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in DRAFT_SETTINGS}
    try:
        for _ in range(repeats):
            for name, extra in DRAFT_SETTINGS.items():
                runs[name] += run_generate(address, max_new_tokens, [*extra, "--no-pipeline"])
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"Reference pair with its bundled gate, {len(PROMPTS.read_text().splitlines())} held-out prompts x "
          f"{repeats}, {max_new_tokens} new tokens, greedy lossless, pipelining off, loopback.\n")  # fmt: skip
    print(
        "| draft length | mean accepted length | target passes/token | drafted/token | bytes up/token | ms/token |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, stats in runs.items():
        row = summarise(stats)
        print(
            f"| {name} | {row['mean_accepted_length']:.3f} | {row['target_passes_per_token']:.3f} | "
            f"{row['drafted_per_token']:.2f} | {row['bytes_up_per_token']:.1f} | {row['ms_per_token']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-lengths", action="store_true", help="instead: fixed draft lengths vs the gate's")
    args = parser.parse_args()
    if args.draft_lengths:
        compare_draft_lengths(args.max_new_tokens, args.repeats)
        return
    process, address = start_cloud()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    try:
        for _ in range(args.repeats):
            for pipeline in (False, True):  # interleaved, so drift hits both alike
                runs[pipeline] += run_generate(address, args.max_new_tokens, [] if pipeline else ["--no-pipeline"])
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"Reference pair, {len(runs[True]) // args.repeats} held-out prompts x {args.repeats}, "
          f"{args.max_new_tokens} new tokens, greedy lossless, draft length 4, loopback (no added RTT).\n")  # fmt: skip
    rows = {pipeline: summarise(stats) for pipeline, stats in runs.items()}
    keys = list(rows[True])
    print("| figure | pipelining off | pipelining on |\n| --- | ---: | ---: |")
    for key in keys:
        print(f"| {key} | {rows[False][key]:.3f} | {rows[True][key]:.3f} |")
    speed = drafter_ms_per_token()
    onnx_ms, torch_ms = speed["onnxruntime_ms_per_token"], speed["torch_ms_per_token"]
    print(f"\nDrafter, one token per call with KV cache: ONNX Runtime {onnx_ms:.2f} ms/token, "
          f"eager PyTorch {torch_ms:.2f} ms/token ({speed['threads']:.0f} torch threads).")  # fmt: skip


if __name__ == "__main__":
    main()
