"""The held-out report and model card of a distilled drafter, beside cut-layer baselines.

Figures: greedy agreement with the target on held-out chat answers and held-out text;
mean accepted length of greedy chain speculation at k = 2/4/6 on the held-out chat
answers; milliseconds per drafted token in ONNX Runtime (one token with a KV cache).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tandemspec.federated.distill.evaluate import DRAFT_LENGTHS, HeldOutSet, greedy_agreement, mean_accepted_length

REPORT_NAME = "report.json"
_TIMED_TOKENS = 64


@dataclass(frozen=True)
class DrafterFigures:
    """How well one drafter serves the target, on held-out data."""

    name: str
    parameters: int
    agreement_chat: float
    agreement_text: float
    mean_accepted_length: dict[int, float]  # draft length -> tokens per target pass (bonus included)
    ms_per_token_onnx: float | None


def onnx_ms_per_token(bundle_dir: Path, prompt: list[int], threads: int) -> float:
    """Median milliseconds of one drafted token (extend by 1 with a KV cache) in ONNX Runtime."""
    from tandemspec.edge.bundle import load_bundle
    from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter

    options = DrafterOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads)
    drafter = OnnxDrafter(load_bundle(bundle_dir), options)
    logits, _ = drafter.reset(prompt)
    times = []
    for _ in range(_TIMED_TOKENS):
        token = int(np.argmax(logits))
        started = time.perf_counter()
        out, _ = drafter.extend([token])
        times.append(time.perf_counter() - started)
        logits = out[-1]
    return float(np.median(times) * 1000)


def measure(
    name: str,
    model: torch.nn.Module,
    held_out: HeldOutSet,
    bundle_dir: Path | None,
    threads: int,
    num_prompts: int | None = None,
) -> DrafterFigures:
    """All figures of one drafter (ms/token only when a bundle of it is given)."""
    model.eval()
    agreement = greedy_agreement(model, held_out)
    accepted = {k: mean_accepted_length(model, held_out, k, num_prompts) for k in DRAFT_LENGTHS}
    ms = onnx_ms_per_token(bundle_dir, held_out.chat_prompts[0], threads) if bundle_dir is not None else None
    return DrafterFigures(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        agreement_chat=agreement["chat"],
        agreement_text=agreement["text"],
        mean_accepted_length=accepted,
        ms_per_token_onnx=ms,
    )


def export_plain(model: torch.nn.Module, tokenizer_dir: Path, out_dir: Path) -> None:
    """An edge bundle of a plain Hugging Face model (a cut-layer baseline), via ``tandem export``."""
    import shutil

    from tandemspec.federated.export import ExportConfig, export_bundle

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)
        export_bundle(ExportConfig(drafter_dir=folder, out_dir=out_dir))


def machine() -> str:
    """A short description of where figures were measured."""
    parts = (platform.machine(), platform.processor(), f"torch {torch.__version__}")
    return " ".join(p for p in parts if p) + f" threads {torch.get_num_threads()}"


def write_report(figures: list[DrafterFigures], training: dict[str, object], path: Path) -> None:
    """Save figures and the training summary as JSON."""
    data = {"drafters": [asdict(f) for f in figures], "training": training, "machine": machine()}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def model_card(report: dict[str, object], command: str) -> str:
    """Markdown model card from a report written by :func:`write_report`."""
    drafters = report["drafters"]
    assert isinstance(drafters, list)
    training = report["training"]
    assert isinstance(training, dict)
    header = " | ".join(f"accepted length k={k}" for k in DRAFT_LENGTHS)
    rows = []
    for d in drafters:
        accepted = " | ".join(f"{d['mean_accepted_length'][str(k)]:.2f}" for k in DRAFT_LENGTHS)  # JSON keys
        ms = "-" if d["ms_per_token_onnx"] is None else f"{d['ms_per_token_onnx']:.1f}"
        rows.append(
            f"| {d['name']} | {d['parameters'] / 1e6:.1f}M | {d['agreement_chat']:.3f} | {d['agreement_text']:.3f} | "
            f"{accepted} | {ms} |"
        )
    table = "\n".join(rows)
    summary = json.dumps(training, indent=2, default=str)
    return f"""# Distilled drafter

| drafter | parameters | greedy agreement, chat | greedy agreement, text | {header} | ms/token (ONNX Runtime) |
| --- | --- | --- | --- | {" | ".join("---" for _ in DRAFT_LENGTHS)} | --- |
{table}

Measured on {report["machine"]}. Held-out data: the target's own greedy answers to held-out
chat prompts (agreement, accepted length) and held-out documentation text (agreement).

Command:

```
{command}
```

Training summary:

```json
{summary}
```
"""
