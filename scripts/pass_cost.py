"""What one target pass costs by the number of tokens it feeds: the break-even of speculative decoding.

A verification pass feeds the pending token plus the draft; cloud-only feeds one token per
step. Where a pass over a few tokens costs about one step (an accelerator), every accepted
draft token is time saved; where it costs more (a CPU: matrix-matrix kernels instead of
matrix-vector ones), lossless decoding only wins once tokens per pass exceed that ratio.

    python scripts/pass_cost.py --model ~/.cache/tandemspec/pairs/smollm2-135m-instruct/target
    python scripts/pass_cost.py --model DIR --device cuda --dtype bfloat16 --random-weights

``--random-weights`` builds the model from the folder's config.json alone (a pass's time does
not depend on its weights), so a GPU machine needs only the config of a large target.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face causal-LM folder")
    parser.add_argument("--tokens", default="1,2,3,5,9,17", help="comma-separated tokens per pass")
    parser.add_argument("--context", type=int, default=200, help="tokens already in the KV cache")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--random-weights", action="store_true", help="build from config.json alone")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.random_weights:
        config = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        prefix = model(torch.randint(0, vocab, (1, args.context), generator=generator).to(device), use_cache=True)
        sizes = [int(t) for t in args.tokens.split(",")]
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for rep in range(args.reps + 2):  # sizes interleaved, so drifting load hits them alike; 2 warm-up rounds
            for n in sizes:
                cache = copy.deepcopy(prefix.past_key_values)
                ids = torch.randint(0, vocab, (1, n), generator=generator).to(device)
                sync()
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True)
                sync()
                if rep >= 2:
                    times[n].append(time.perf_counter() - start)
    medians = {n: statistics.median(t) for n, t in times.items()}
    one = medians.get(1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    weights = "random weights" if args.random_weights else "its weights"
    print(
        f"{args.model} ({where}, {args.dtype}, {args.attn} attention, {weights}, {args.context} tokens cached, "
        f"median of {args.reps})"
    )
    print("| tokens per pass | ms | × one-token step |")
    print("| ---: | ---: | ---: |")
    for n, seconds in medians.items():
        ratio = f"{seconds / one:.2f}" if one else "-"
        print(f"| {n} | {1e3 * seconds:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
