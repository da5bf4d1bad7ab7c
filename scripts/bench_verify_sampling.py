"""Microbenchmark: the cost of one sampling verification round on the verifier's hot path.

One round is what the verifier does per draft frame after batching: the target forward
over ``pending + k`` draft tokens (with the logits it hands to judging) and
``judge_frame`` (target probabilities, acceptance, the correction or bonus draw). It runs
in-process on the bundled reference target, with no gRPC, so two versions of the code can
be compared on one machine; the script uses only APIs both sides of a change keep
(``TargetModel.load/prefill/forward``, ``ForwardRow(kv, ids)``, ``judge_frame``)::

    python scripts/bench_verify_sampling.py                     # this checkout
    git archive <commit> | tar -x -C /tmp/old                   # another version, laid out
    PYTHONPATH=<a tandemspec/ tree of it> python scripts/bench_verify_sampling.py

Prints the mean milliseconds per round of the forward and of judging, per sampling setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tandemspec
from tandemspec.cloud.config import default_model_dir
from tandemspec.cloud.target import ForwardRow, TargetModel
from tandemspec.cloud.verify import judge_frame
from tandemspec.sampling import process_logits, truncate
from tandemspec.types import DraftFrame, SamplingParams

SETTINGS = {
    "temperature 0.8": SamplingParams(temperature=0.8, seed=1),
    "temperature 0.8, top-p 0.95": SamplingParams(temperature=0.8, top_p=0.95, seed=1),
    "temperature 1, top-k 50": SamplingParams(temperature=1.0, top_k=50, seed=1),
}


def bench(target: TargetModel, sampling: SamplingParams, args: argparse.Namespace) -> tuple[float, float, float]:
    """Mean (forward ms, judge ms, acceptance rate) over ``args.rounds`` rounds."""
    rng = np.random.default_rng(0)
    prompt = tuple(int(t) for t in rng.integers(3, target.vocab_size, size=args.prompt_len))
    past = target.prefill(prompt[:-1]).kv
    # Drafts come from a drafter-like q: the target's own next-token distribution, truncated.
    reference = target.forward([ForwardRow(past, prompt[-1:])])[0].logits
    p_next = process_logits(np.asarray(torch.as_tensor(reference).float().cpu())[-1], sampling)
    q = truncate(p_next, args.support)
    forward_s = judge_s = 0.0
    accepted = 0
    for round_index in range(args.warmup + args.rounds):
        draft = tuple(int(rng.choice(q.ids, p=q.probs)) for _ in range(args.draft_len))
        frame = DraftFrame(
            seq=round_index, epoch=0, position=len(prompt), draft_ids=draft, draft_dists=(q,) * args.draft_len
        )
        start = time.perf_counter()
        output = target.forward([ForwardRow(past, prompt[-1:] + draft)])[0]
        middle = time.perf_counter()
        outcome = judge_frame(output.logits[-(1 + args.draft_len) :], frame, sampling, return_top_k=0)
        end = time.perf_counter()
        if round_index >= args.warmup:
            forward_s += middle - start
            judge_s += end - middle
            accepted += outcome.num_accepted
    n = args.rounds
    return forward_s / n * 1e3, judge_s / n * 1e3, accepted / (n * args.draft_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--support", type=int, default=16, help="draft distribution support")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = TargetModel.load(args.model, args.device)
    print(
        f"code: {Path(tandemspec.__file__).parent}  target: {args.model} (vocab {target.vocab_size}, {target.device})"
    )
    print(f"{args.rounds} rounds of {args.draft_len} draft tokens, {args.threads} thread(s)\n")
    print("| sampling | forward ms/round | judge ms/round | acceptance |")
    print("|---|---:|---:|---:|")
    for name, sampling in SETTINGS.items():
        forward_ms, judge_ms, acceptance = bench(target, sampling, args)
        print(f"| {name} | {forward_ms:.2f} | {judge_ms:.2f} | {acceptance:.2f} |")


if __name__ == "__main__":
    main()
