"""Tune the centralised bound's drafter training on a cheap proxy before decoding with it.

Proxy: greedy agreement of the drafter with the target on every device's held-out prompts,
teacher-forced along the target's own greedy continuation (``--new-tokens`` per prompt) -
the per-token chance that lossless verification accepts a draft, without a verifier. Each
setting trains ``--rounds`` rounds of pooled distillation (the same ``distill_local`` the
devices and ``tandem fed central`` use) and prints the proxy after every round; ``--compare``
scores given drafter state files (e.g. a federated run's published ``drafter.safetensors``).

    python scripts/fed_central_tune.py --fleet runs/fed8/fleet --rounds 5 \
        --setting steps=192,batch=8,lr=3e-4 --setting steps=24,batch=64,lr=3e-4 \
        --compare runs/fed8/out/versions/v0006/drafter.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.federated.fed.centralised import pooled
from tandemspec.federated.fed.fleet import read_fleet, read_heldout
from tandemspec.federated.fed.tasks import LocalTrainConfig, distill_local, read_local


def continuations(target_dir: Path, prompts: list[tuple[int, ...]], new_tokens: int) -> list[list[int]]:
    """prompt + the target's greedy continuation, per prompt."""
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
            out.append(seq[0].tolist())
    return out


def agreement(drafter_dir: Path, state: dict[str, np.ndarray], seqs: list[list[int]], starts: list[int]) -> float:
    """Share of continuation positions where the drafter's argmax equals the target's token."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(drafter_dir))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for seq, start in zip(seqs, starts, strict=True):
            logits = model(input_ids=torch.tensor([seq])).logits[0]
            predicted = logits[start - 1 : len(seq) - 1].argmax(-1)
            hits += int((predicted == torch.tensor(seq[start:])).sum())
            total += len(seq) - start
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--pair", type=Path, default=Path("models/reference"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--setting", action="append", default=[], help="steps=N,batch=B,lr=X per setting")
    parser.add_argument("--compare", action="append", default=[], type=Path, help="drafter state files to score")
    args = parser.parse_args()
    torch.set_num_threads(1)

    devices = read_fleet(args.fleet)
    tokenizer = EdgeTokenizer(args.pair / "edge" / "tokenizer.json", None, ())
    prompts = [tokenizer.encode_prompt(p) for d in devices for p in read_heldout(args.fleet, d)]
    started = time.perf_counter()
    seqs = continuations(args.pair / "target", prompts, args.new_tokens)
    starts = [len(p) for p in prompts]
    print(f"{len(seqs)} held-out prompts, target continuations in {time.perf_counter() - started:.0f} s", flush=True)
    initial = load_file(str(args.pair / "drafter" / "model.safetensors"))
    print(f"start: agreement {agreement(args.pair / 'drafter', initial, seqs, starts):.4f}", flush=True)
    for path in args.compare:
        print(f"{path}: agreement {agreement(args.pair / 'drafter', load_file(str(path)), seqs, starts):.4f}")
    everything = pooled([read_local(d.log_path(args.fleet)) for d in devices])
    for setting in args.setting:
        values = dict(item.split("=") for item in setting.split(","))
        config = LocalTrainConfig(
            distill_steps=int(values["steps"]), distill_batch=int(values["batch"]), distill_lr=float(values["lr"])
        )
        state = {k: np.array(v) for k, v in initial.items()}
        line = []
        for round_number in range(1, args.rounds + 1):
            round_config = dataclasses.replace(config, seed=config.seed + 1000 * round_number)
            state, _, _ = distill_local(args.pair / "drafter", state, everything, round_config)
            line.append(f"{agreement(args.pair / 'drafter', state, seqs, starts):.4f}")
            print(f"{setting} round {round_number}: {line[-1]}", flush=True)
        print(f"{setting}: {' '.join(line)} ({time.perf_counter() - started:.0f} s so far)", flush=True)


if __name__ == "__main__":
    main()
