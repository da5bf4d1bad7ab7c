"""``tandem train-reference`` and ``tandem evaluate-reference``."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from tandemspec.federated.reference.evaluate import DRAFT_LENGTHS, PairFigures, evaluate_pair, write_figures
from tandemspec.federated.reference.train import ReferenceTrainer, TrainReferenceConfig

logger = logging.getLogger(__name__)


def train_main(args: argparse.Namespace) -> int:
    """Rebuild tokenizer, target and drafter (resumable), then publish the pair."""
    logging.getLogger("tandemspec").setLevel(logging.INFO)
    config = TrainReferenceConfig(work_dir=args.work_dir, out_dir=args.out, threads=args.threads, seed=args.seed)
    ReferenceTrainer(config).run()
    print(f"reference pair written to {args.out}")
    return 0


def evaluate_main(args: argparse.Namespace) -> int:
    """Measure the pair; with ``--card``, rewrite its model card."""
    import torch

    torch.set_num_threads(args.threads)
    figures = evaluate_pair(args.pair, args.base_drafter)
    write_figures(figures, args.pair / "figures.json")
    print(json.dumps(asdict(figures), indent=2))
    if args.card:
        (args.pair / "README.md").write_text(model_card(figures, args.pair))
        print(f"model card written to {args.pair / 'README.md'}")
    return 0


def _size_row(name: str, parameters: int, shape: dict[str, int], dtype: str) -> str:
    return (
        f"| `{name}/` | {parameters / 1e6:.2f}M | {shape['hidden_size']} | {shape['num_layers']} | "
        f"{shape['num_heads']} | {shape['intermediate_size']} | {dtype} |"
    )


def model_card(figures: PairFigures, pair_dir: Path) -> str:
    """The model card (Markdown) from measured figures and the training summary."""
    training = json.loads((pair_dir / "training.json").read_text())
    config = training["config"]
    rows = []
    for name, drafter in figures.drafters.items():
        accepted = " | ".join(f"{drafter.mean_accepted_length[k]:.2f}" for k in DRAFT_LENGTHS)
        rows.append(
            f"| drafter, {name} | {drafter.held_out_loss:.3f} | {drafter.held_out_perplexity:.1f} | "
            f"{drafter.greedy_agreement:.3f} | {accepted} |"
        )
    k_header = " | ".join(f"accepted length, k={k}" for k in DRAFT_LENGTHS)
    samples = "\n\n".join(f"```python\n{text}\n```" for text in figures.samples)
    scores = ", ".join(f"{k}: {v:.4f}" for k, v in training["validation_agreement_by_objective"].items())
    return f"""# tandemspec reference pair

A target and a drafter trained from scratch on this machine, so that tandemspec's demo,
benchmarks and integration tests have a real model pair without a model hub. Both are
Llama-architecture models in Hugging Face format and share one byte-level BPE tokenizer.

| model | parameters | hidden | layers | heads | MLP | stored as |
| --- | --- | --- | --- | --- | --- | --- |
{_size_row("target", figures.target_parameters, config["target"], config["target_save_dtype"])}
{_size_row("drafter", figures.drafter_parameters, config["drafter"], "float32")}

The drafter's per-token compute (block weights plus LM head) is about a fifth of the target's.

## Data

Python source of the standard library of the interpreter that trained them (CPython
3.11): training on everything but `email/` (held out for validation) and test folders
(kept out entirely); about 3.1M training tokens with an {config["vocab_size"]}-token
byte-level BPE. Documents are joined as `<|bos|> ... <|eos|>`.

## Training

1. Tokenizer on the training split.
2. Target: next-token pretraining, {config["target_schedule"]["steps"]} steps of
   {config["target_schedule"]["batch_size"]}x{config["seq_len"]} tokens.
3. Drafter: next-token pretraining, {config["drafter_schedule"]["steps"]} steps.
4. DistillSpec (arXiv:2310.08461) on-policy distillation of the drafter toward the target:
   the drafter samples continuations of real prefixes, the target scores them, and the
   drafter minimises either total variation or forward KL ({config["distill_schedule"]["steps"]}
   steps each, from the same pretrained drafter). Validation greedy agreement: {scores};
   kept: **{training["chosen_objective"]}**.

Rebuild (resumable; about 1.5 hours on 2 CPU cores):

```
tandem train-reference --work-dir runs/reference --out models/reference
```

## Measured figures

Held-out split (`email/`, {figures.validation_tokens:,} tokens in windows of 256). Target held-out
loss **{figures.target_held_out_loss:.3f}** (perplexity {figures.target_held_out_perplexity:.1f}).
Greedy agreement: share of positions where drafter and target argmax agree. Accepted length:
tokens per target pass of chain greedy speculative decoding with draft length k (bonus
included), over {figures.speculation_prompts} held-out prompts of 64 tokens with {figures.speculation_new_tokens}
new tokens each.

| model | held-out loss | perplexity | greedy agreement | {k_header} |
| --- | --- | --- | --- | {" | ".join("---" for _ in DRAFT_LENGTHS)} |
{chr(10).join(rows)}

Measured with (took {figures.seconds:.0f} s on {figures.machine}):

```
tandem evaluate-reference --pair models/reference --base-drafter runs/reference/drafter-base/final --card
```

## Samples from the target

Temperature 0.8, top-p 0.95, 80 new tokens, seeded; openings `import os`, `def `, `class `.

{samples}
"""
