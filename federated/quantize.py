"""``tandem quantize``: an edge bundle whose drafter runs with int8 weights.

ONNX Runtime's dynamic quantisation stores every MatMul weight as int8 (per output
channel) and quantises activations on the fly; on a CPU without fast fp16 kernels it is
the format that makes a drafter cheaper per token. Verification stays lossless whatever
the drafter computes (the verifier judges the q the edge actually drafted from), so the
trade is speed against acceptance; the command measures both sides on a probe text: ms
per drafted token of the float and the int8 graph (one token at a time with a KV cache,
as the edge drafts) and how often the int8 graph's argmax is the float graph's.

    tandem quantize --bundle DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tandemspec.edge.bundle import DRAFTER_NAME, MANIFEST_NAME, hash_files, load_bundle, staged_bundle
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer

logger = logging.getLogger(__name__)

INT8 = "int8"
PROBE_TEXT = (
    "The verifier holds the large model and judges the tokens a device drafts. "
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total / len(values)\n\n"
    "Speculative decoding keeps the target's output distribution: a drafted token is kept "
    "with probability min(1, p/q), and a rejected one is replaced by a sample of the residual."
)
_TIMED_STEPS = 32


class QuantizeError(RuntimeError):
    """A bundle cannot be quantised."""


@dataclass(frozen=True)
class QuantizeReport:
    """What quantisation changed, measured on :data:`PROBE_TEXT` with one ONNX Runtime thread."""

    float_mb: float
    int8_mb: float
    float_ms_per_token: float
    int8_ms_per_token: float
    top1_agreement: float  # share of probe positions where the int8 argmax is the float one
    probe_tokens: int


def quantize_bundle(bundle_dir: Path, out_dir: Path) -> QuantizeReport:
    """Write ``out_dir``: ``bundle_dir`` with its drafter's MatMul weights in int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = load_bundle(bundle_dir)
    if source.manifest.weights == INT8:
        raise QuantizeError(f"{bundle_dir} is already int8")
    with staged_bundle(out_dir) as staging:
        for name in source.manifest.files:
            if name != DRAFTER_NAME:
                shutil.copy(source.path / name, staging / name)
        quantize_dynamic(
            str(source.drafter_path),
            str(staging / DRAFTER_NAME),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
        )
        manifest = replace(source.manifest, weights=INT8)
        manifest = replace(manifest, files=hash_files(staging, sorted(manifest.files)))
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        report = compare(bundle_dir, staging)
    return report


def compare(float_dir: Path, int8_dir: Path) -> QuantizeReport:
    """Size, ms per drafted token and top-1 agreement of two bundles of one drafter."""
    bundles = [load_bundle(float_dir), load_bundle(int8_dir)]
    probe = list(EdgeTokenizer.from_bundle(bundles[0]).encode_prompt(PROBE_TEXT))
    if len(probe) < 8:
        raise QuantizeError("the probe text encodes to too few tokens")
    options = DrafterOptions(intra_op_threads=1, providers=("CPUExecutionProvider",))
    drafters = [OnnxDrafter(b, options) for b in bundles]
    tops = []
    for drafter in drafters:
        all_logits, _ = drafter.extend(probe)
        if not np.isfinite(all_logits).all():
            raise QuantizeError("the quantised drafter produced non-finite logits")
        tops.append(all_logits.argmax(-1))
    timings: list[list[float]] = [[], []]
    for _ in range(3):  # interleaved, the best of three: the machine may be shared
        for index, drafter in enumerate(drafters):
            token = int(np.argmax(drafter.reset(probe[: len(probe) // 2])[0]))
            started = time.perf_counter()
            for _ in range(_TIMED_STEPS):
                token = int(np.argmax(drafter.extend([token])[0][-1]))
            timings[index].append((time.perf_counter() - started) / _TIMED_STEPS * 1e3)
    sizes = [b.drafter_path.stat().st_size / 1e6 for b in bundles]
    return QuantizeReport(
        float_mb=round(sizes[0], 1),
        int8_mb=round(sizes[1], 1),
        float_ms_per_token=round(min(timings[0]), 2),
        int8_ms_per_token=round(min(timings[1]), 2),
        top1_agreement=round(float((tops[0] == tops[1]).mean()), 4),
        probe_tokens=len(probe),
    )


def quantize_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem quantize``."""
    try:
        report = quantize_bundle(args.bundle, args.out)
    except (QuantizeError, ValueError, OSError) as error:
        print(f"tandem quantize: {error}")
        return 1
    print(f"int8 edge bundle written to {args.out}")
    print(json.dumps(asdict(report), indent=2))
    return 0
