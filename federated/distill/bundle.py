"""Edge bundle of a reduced-head drafter, through ``tandem export``'s own steps.

The graph keeps the bundle contract (``logits`` over the target's whole vocabulary, with
:data:`~tandemspec.federated.distill.model.DRAFT_FILL` outside the draft head), so the edge
runs it unchanged. Parity is checked with the edge's own runtime on the head's columns,
and the columns outside the head must hold exactly the fill value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tandemspec.edge.bundle import load_bundle, staged_bundle
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.federated.distill.model import DRAFT_FILL, DraftHeadModel, load_drafter
from tandemspec.federated.export import ExportConfig, ExportError, build_manifest, write_bundle_files

logger = logging.getLogger(__name__)

_PARITY_PROMPT = 7


def check_head_parity(model: DraftHeadModel, bundle_dir: Path, tolerance: float, seed: int = 0) -> float:
    """Worst relative error of ONNX vs PyTorch over prefill, steps with past and a rollback."""
    drafter = OnnxDrafter(load_bundle(bundle_dir), DrafterOptions(providers=("CPUExecutionProvider",)))
    head = model.draft_ids.numpy()
    outside = np.ones(model.spec.target_vocab_size, dtype=bool)
    outside[head] = False
    rng = np.random.default_rng(seed)
    prompt = rng.choice(head, _PARITY_PROMPT).tolist()
    one, three, other = (rng.choice(head, n).tolist() for n in (1, 3, 3))
    worst = 0.0

    def compare(ids: list[int], got: tuple[np.ndarray, np.ndarray], first: int) -> None:
        nonlocal worst
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        want = out.logits[0, first:].numpy()  # [n, vocab]
        if got[0].shape != want.shape or not np.all(got[0][:, outside] == DRAFT_FILL):
            raise ExportError("ONNX logits outside the draft head are not the fill value")
        scale = max(1.0, float(np.abs(want[:, head]).max()))
        worst = max(worst, float(np.abs(got[0][:, head] - want[:, head]).max()) / scale)
        hidden = out.hidden_states[-1][0, first:].numpy()
        worst = max(worst, float(np.abs(got[1] - hidden).max()) / max(1.0, float(np.abs(hidden).max())))

    compare(prompt, drafter.extend(prompt), 0)
    compare(prompt + one, drafter.extend(one), len(prompt))
    compare(prompt + one + three, drafter.extend(three), len(prompt) + 1)
    drafter.rollback(len(prompt) + 1)
    compare(prompt + one + other, drafter.extend(other), len(prompt) + 1)
    if worst > tolerance:
        raise ExportError(f"ONNX output differs from PyTorch by {worst:.2e} (tolerance {tolerance})")
    return worst


def export_draft_bundle(
    drafter_dir: Path, out_dir: Path, gate_path: Path | None = None, tolerance: float = 1e-3
) -> float:
    """Export ``drafter_dir`` (a reduced-head drafter) as an edge bundle; returns the worst parity error."""
    model = load_drafter(drafter_dir)
    config = ExportConfig(drafter_dir=drafter_dir, out_dir=out_dir, gate_path=gate_path)
    manifest = build_manifest(model, drafter_dir, config.opset)
    with staged_bundle(out_dir) as staging:
        write_bundle_files(model, manifest, staging, config)  # as `tandem export` writes them
        worst = check_head_parity(model, staging, tolerance)
    logger.info("exported %s to %s (worst parity error %.2e)", drafter_dir, out_dir, worst)
    return worst
