"""What any gate could reach on a pair: the drafter's disagreements along the target's greedy path.

For each held-out bench prompt the target generates greedily; the drafter is then run
teacher-forced over the same text. At every position where the drafter's argmax differs
from the target's token, a gated edge must either ask the cloud (one target pass, which
returns the target's token) or trust the drafter (free, at a cost of
``log p_target(target token) - log p_target(drafter token)`` nats there). So:

* a perfect accept/reject gate reproduces the target exactly at
  ``disagreements / tokens`` target passes per token - the floor for quality 1;
* a perfect *cost-aware* gate that trusts the cheapest disagreements gives up their share
  of the total cost (ignoring that a trusted token changes later context).

Prints Markdown. ``python scripts/gate_bounds.py [--max-new-tokens 64]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tandemspec.bench.prompts import load_prompts
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.tokenizer import EdgeTokenizer

PAIR = Path(__file__).resolve().parent.parent / "models" / "reference"


def disagreement_costs(max_new_tokens: int) -> tuple[np.ndarray, int]:
    """NLL cost (nats) of each position where the drafter's argmax is not the target's token; total tokens."""
    tokenizer = EdgeTokenizer.from_bundle(load_bundle(PAIR / "edge"))
    target = AutoModelForCausalLM.from_pretrained(PAIR / "target", dtype=torch.float32).eval()
    drafter = AutoModelForCausalLM.from_pretrained(PAIR / "drafter", dtype=torch.float32).eval()
    costs: list[float] = []
    total = 0
    for prompt in load_prompts():
        ids = tokenizer.encode_prompt(prompt)
        with torch.no_grad():
            sequence = target.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )[0]  # [T]
            log_p = torch.log_softmax(target(sequence[None]).logits[0].float(), dim=-1)  # [T, V]
            drafted = drafter(sequence[None]).logits[0].argmax(-1)  # [T]: row t predicts token t + 1
        for position in range(len(ids), len(sequence)):
            chosen, wanted = int(drafted[position - 1]), int(sequence[position])
            total += 1
            if chosen != wanted:
                costs.append(float(log_p[position - 1, wanted] - log_p[position - 1, chosen]))
    return np.sort(np.asarray(costs)), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    costs, total = disagreement_costs(args.max_new_tokens)
    print(
        f"{total} tokens of the target's greedy output on the bench prompts; the drafter disagrees at "
        f"{len(costs)} ({len(costs) / total:.3f} per token). Perfect accept/reject gate: quality 1 at "
        f"{len(costs) / total:.3f} target passes/token.\n"
    )
    header = ("disagreements trusted (cheapest first)", "target passes/token", "share of total cost", "largest, nats")
    print("| " + " | ".join(header) + " |")
    print("| ---: | ---: | ---: | ---: |")
    for share in (0.0, 0.1, 0.2, 0.35, 0.5):
        k = int(share * len(costs))
        passes = (len(costs) - k) / total
        largest = f"{costs[k - 1]:.3f}" if k else "-"
        print(f"| {share:.0%} | {passes:.3f} | {costs[:k].sum() / costs.sum():.3f} | {largest} |")


if __name__ == "__main__":
    main()
