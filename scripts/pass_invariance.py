"""Does the verifier's target give the same logits in a pass over several tokens as in one-token steps?

Cloud-only decoding computes each position in a one-token step; lossless decoding in a pass
over the pending token and the draft. Lossless output equals cloud-only output token for
token only where the two give the same greedy choices. This generates greedily with
one-token steps through the verifier's own forward (``TargetModel``, prefill in the
verifier's chunks), then feeds the same tokens again in passes of N and reports, per N, the
prompts whose greedy tokens differ and the largest logit difference at the same positions,
and the prompts where transformers' ``generate`` (the whole prompt in one pass, then one-token
steps) gives other greedy tokens than the verifier's steps.

    python scripts/pass_invariance.py --model models/reference/target --dtype bfloat16
    python scripts/pass_invariance.py --model DIR --device cuda --dtype bfloat16 --attn sdpa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tandemspec.bench.prompts import load_prompts
from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.target import ForwardRow, SessionKV, TargetModel

PREFILL_CHUNK = CloudConfig.prefill_chunk_tokens  # the verifier's own default


def prefill(target: TargetModel, ids: list[int]) -> SessionKV:
    """Every token but the last, in the verifier's chunks (the last is fed with the first step)."""
    kv = SessionKV.empty()
    for start in range(0, len(ids) - 1, PREFILL_CHUNK):
        chunk = tuple(ids[start : min(start + PREFILL_CHUNK, len(ids) - 1)])
        kv = target.forward([ForwardRow(kv, chunk, num_logits=0)])[0].kv
    return kv


def stepwise(target: TargetModel, ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from one-token steps and each step's logits [new_tokens, vocab]."""
    kv, last, out, rows = prefill(target, ids), ids[-1], [], []
    for _ in range(new_tokens):
        output = target.forward([ForwardRow(kv, (last,), num_logits=1)])[0]
        kv, last = output.kv, int(output.logits[-1].argmax())
        out.append(last)
        rows.append(output.logits[-1])
    return out, torch.stack(rows)


def passwise(target: TargetModel, ids: list[int], out: list[int], size: int) -> torch.Tensor:
    """The logits at the same positions, fed ``size`` tokens per pass: [len(out), vocab]."""
    kv, fed, rows = prefill(target, ids), [ids[-1], *out[:-1]], []
    for start in range(0, len(fed), size):
        chunk = tuple(fed[start : start + size])
        output = target.forward([ForwardRow(kv, chunk, num_logits=len(chunk))])[0]
        kv = output.kv
        rows.append(output.logits)
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face causal-LM folder")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: --model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--attn", default="auto", help="auto (the verifier's choice), sdpa, eager, ...")
    parser.add_argument("--pass-tokens", default="2,5,9,17", help="comma-separated tokens per pass")
    parser.add_argument("--prompts", type=int, default=16, help="bench prompts to generate from")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    target = TargetModel.load(args.model, args.device, args.dtype, attention=args.attn)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    sizes = [int(n) for n in args.pass_tokens.split(",")]
    differ = {n: 0 for n in sizes}
    max_diff = {n: 0.0 for n in sizes}
    generate_differs = 0
    prompts = load_prompts()[: args.prompts]
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        out, step_logits = stepwise(target, ids, args.new_tokens)
        with torch.inference_mode():
            ids_tensor = torch.tensor([ids], device=target.device)
            generated = target.model.generate(
                ids_tensor, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
        generate_differs += int(generated[0, len(ids) :].tolist() != out)
        for n in sizes:
            logits = passwise(target, ids, out, n)
            differ[n] += int(logits.argmax(-1).tolist() != out)
            max_diff[n] = max(max_diff[n], float((logits - step_logits).abs().max()))
    print(
        json.dumps(
            {
                "model": str(args.model),
                "device": str(target.device),
                "dtype": target.dtype_name,
                "attention": target.attention,
                "prompts": len(prompts),
                "new_tokens": args.new_tokens,
                "prompts_whose_greedy_tokens_differ": differ,
                "max_logit_difference": max_diff,
                "prompts_where_generate_differs": generate_differs,
            }
        )
    )


if __name__ == "__main__":
    main()
