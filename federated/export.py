"""``tandem export``: turn a Hugging Face drafter into an edge bundle (ONNX), checked for parity.

The drafter is wrapped so that its forward takes flat tensors
``input_ids, attention_mask, position_ids, *past`` and returns
``logits, hidden, *present`` (the graph contract is in :mod:`tandemspec.edge.bundle`:
caches are [batch, seq, kv_heads, head_dim] and ``present`` holds the new tokens only),
then exported with ``torch.onnx.export(dynamo=True)`` and named dimensions. Before the
bundle is published, :class:`~tandemspec.edge.drafter.OnnxDrafter` (the edge's own runtime)
is run against the eager PyTorch model on a prefill, a single token with past, several
tokens with past and a rollback; any difference beyond tolerance fails the export.

The tokenizer is carried so that the edge encodes as the drafter's ``AutoTokenizer`` does:
``tokenizer.json`` is the tokenizer transformers actually runs (its post-processor, e.g. the
BOS, may come from ``tokenizer_config.json``), checked on probe texts; the chat
template (``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``) becomes
the bundle's ``chat_template.jinja``, and the special tokens its variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from tandemspec.edge.bundle import (
    BUNDLE_VERSION,
    CHAT_TEMPLATE_NAME,
    DRAFTER_NAME,
    GATE_NAME,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    BundleError,
    BundleManifest,
    hash_files,
    load_bundle,
    staged_bundle,
)
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.fingerprint import tokenizer_fingerprint

logger = logging.getLogger(__name__)

_EXTERNAL_DATA_BYTES = 1_500_000_000  # beyond this the weights go to drafter.onnx.data (protobuf's 2 GB cap)
_PARITY_PROMPT = 7
# Texts on which the bundle's tokenizer must encode exactly as AutoTokenizer does.
_TOKENIZER_PROBES = ("", "Hello, world!", "def f(x):\n    return x + 1\n", "  two leading spaces", "café 中文 😀")


class ExportError(RuntimeError):
    """The drafter cannot be exported, or the exported graph disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportConfig:
    """What ``tandem export`` does."""

    drafter_dir: Path
    out_dir: Path
    opset: int = 18
    gate_path: Path | None = None  # an ONNX gate graph to include as gate.onnx
    tolerance: float = 1e-3  # max |onnx - torch| relative to max(1, max |torch|)


@dataclass(frozen=True)
class ParityReport:
    """Worst relative differences found by :func:`check_parity`, per case."""

    logits: dict[str, float]
    hidden: dict[str, float]

    @property
    def worst(self) -> float:
        return max([*self.logits.values(), *self.hidden.values()])


class DrafterWrapper(torch.nn.Module):
    """Flat-tensor forward for export: (ids, mask, positions, *past) -> (logits, hidden, *present)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        # past[2i], past[2i+1]: [batch, past, kv_heads, head_dim]; HF caches want [batch, kv_heads, past, head_dim].
        pairs = [(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2)) for i in range(self.num_layers)]
        past_length = past[0].shape[1]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            # Only the new tokens' keys/values: [batch, seq, kv_heads, head_dim].
            present.append(layer.keys[:, :, past_length:, :].transpose(1, 2))
            present.append(layer.values[:, :, past_length:, :].transpose(1, 2))
        return (out.logits, out.hidden_states[-1], *present)


def load_drafter(drafter_dir: Path) -> PreTrainedModel:
    """Load a causal LM in float32 on the CPU, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot load a causal LM from {drafter_dir}: {error}") from error
    return model.eval()


def build_manifest(model: PreTrainedModel, drafter_dir: Path, opset: int) -> BundleManifest:
    """Dimensions and special ids of ``model`` (files and hashes are added later)."""
    config = model.config
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not max_positions:
        raise ExportError(f"{drafter_dir}: config has no max_position_embeddings")
    special = _special_ids(model, drafter_dir)
    return BundleManifest(
        bundle_version=BUNDLE_VERSION,
        family=str(config.model_type),
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_positions=int(max_positions),
        opset=opset,
        tokenizer_fingerprint=tokenizer_fingerprint(drafter_dir / TOKENIZER_NAME),
        bos_id=special["bos"][0] if special["bos"] else None,
        eos_ids=tuple(special["eos"]),
        pad_id=special["pad"][0] if special["pad"] else None,
        source=drafter_dir.resolve().name,
    )


def _special_ids(model: PreTrainedModel, drafter_dir: Path) -> dict[str, list[int]]:
    """bos/eos/pad ids from the model config, else the generation config, else the tokenizer files."""
    found: dict[str, list[int]] = {}
    tokenizer_ids = _tokenizer_special_ids(drafter_dir)
    for kind in ("bos", "eos", "pad"):
        value: Any = getattr(model.config, f"{kind}_token_id", None)
        if value is None and model.generation_config is not None:
            value = getattr(model.generation_config, f"{kind}_token_id", None)
        if value is None:
            value = tokenizer_ids.get(kind)
        found[kind] = (
            [int(v) for v in value] if isinstance(value, list | tuple) else ([] if value is None else [int(value)])
        )
    return found


def _tokenizer_special_ids(drafter_dir: Path) -> dict[str, int]:
    config_path = drafter_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    vocab = {t["content"]: t["id"] for t in json.loads((drafter_dir / TOKENIZER_NAME).read_text())["added_tokens"]}
    out: dict[str, int] = {}
    for kind in ("bos", "eos", "pad"):
        token = config.get(f"{kind}_token")
        content = token.get("content") if isinstance(token, dict) else token
        if content in vocab:
            out[kind] = int(vocab[content])
    return out


def _io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past.{name}" for name in kv]
    outputs = ["logits", "hidden"] + [f"present.{name}" for name in kv]
    return inputs, outputs


def export_onnx(model: PreTrainedModel, manifest: BundleManifest, path: Path, config: ExportConfig) -> None:
    """Write ``drafter.onnx`` (and ``drafter.onnx.data`` for large models) with dynamic dims."""
    wrapper = DrafterWrapper(model).eval()
    m = manifest
    seq, past_length = 2, 3  # example sizes other than 0/1, which torch.export would specialise
    input_ids = torch.randint(3, m.vocab_size, (1, seq))
    mask = torch.ones(1, past_length + seq, dtype=torch.int64)
    positions = torch.arange(past_length, past_length + seq)[None, :]
    past = tuple(torch.zeros(1, past_length, m.num_kv_heads, m.head_dim) for _ in range(2 * m.num_layers))
    input_names, output_names = _io_names(m.num_layers)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        _export_dynamo(wrapper, (input_ids, mask, positions, *past), input_names, output_names, path, config, m)
    if parameter_bytes > _EXTERNAL_DATA_BYTES:
        logger.info("weights stored next to the graph in %s.data", path.name)


def _export_dynamo(
    wrapper: DrafterWrapper,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    config: ExportConfig,
    m: BundleManifest,
) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=m.max_positions)
    past = Dim("past", min=0, max=m.max_positions)
    total = Dim("total", min=1, max=2 * m.max_positions)  # past + seq arithmetic is rejected: own dim
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 1: past} for _ in args[3:]),
    )
    parameter_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=config.opset,
        dynamo=True,
        external_data=parameter_bytes > _EXTERNAL_DATA_BYTES,
        optimize=True,
        verbose=False,
    )


def check_parity(model: PreTrainedModel, bundle_dir: Path, tolerance: float, seed: int = 0) -> ParityReport:
    """Run the edge runtime against eager PyTorch; raises :class:`ExportError` beyond ``tolerance``.

    Cases: prefill of a prompt; one token with past; three tokens with past; three other
    tokens after rolling the cache back (the rejected-draft path).
    """
    drafter = OnnxDrafter(load_bundle(bundle_dir), DrafterOptions(providers=("CPUExecutionProvider",)))
    vocab = drafter.manifest.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, _PARITY_PROMPT).tolist()
    one, three, other = (
        rng.integers(3, vocab, 1).tolist(),
        rng.integers(3, vocab, 3).tolist(),
        rng.integers(3, vocab, 3).tolist(),
    )
    logits: dict[str, float] = {}
    hidden: dict[str, float] = {}

    def compare(case: str, ids: list[int], got: tuple[np.ndarray, np.ndarray], first: int) -> None:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        want_logits = out.logits[0, first:].numpy()  # [n, vocab]
        want_hidden = out.hidden_states[-1][0, first:].numpy()  # [n, hidden]
        logits[case] = _relative_error(got[0], want_logits)
        hidden[case] = _relative_error(got[1], want_hidden)

    compare("prefill", prompt, drafter.extend(prompt), 0)
    compare("one_with_past", prompt + one, drafter.extend(one), len(prompt))
    compare("three_with_past", prompt + one + three, drafter.extend(three), len(prompt) + 1)
    drafter.rollback(len(prompt) + 1)
    compare("after_rollback", prompt + one + other, drafter.extend(other), len(prompt) + 1)
    report = ParityReport(logits=logits, hidden=hidden)
    if report.worst > tolerance:
        raise ExportError(f"ONNX output differs from PyTorch beyond {tolerance}: logits {logits}, hidden {hidden}")
    return report


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise ExportError(f"shape mismatch: ONNX {got.shape} vs PyTorch {want.shape}")
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def export_bundle(config: ExportConfig) -> tuple[BundleManifest, ParityReport]:
    """Export, check parity, then publish the bundle at ``config.out_dir`` in one rename."""
    drafter_dir = Path(config.drafter_dir)
    if not (drafter_dir / TOKENIZER_NAME).is_file():
        raise ExportError(f"{drafter_dir} has no {TOKENIZER_NAME}; the edge needs the drafter's fast tokenizer")
    out_dir = Path(config.out_dir)
    with staged_bundle(out_dir) as staging:
        model = load_drafter(drafter_dir)
        manifest = build_manifest(model, drafter_dir, config.opset)
        manifest = write_bundle_files(model, manifest, staging, config)
        report = check_parity(model, staging, config.tolerance)
    logger.info("exported %s to %s (worst parity error %.2e)", drafter_dir, out_dir, report.worst)
    return manifest, report


def write_bundle_files(
    model: PreTrainedModel, manifest: BundleManifest, staging: Path, config: ExportConfig
) -> BundleManifest:
    """The graph, the tokenizer (and chat template), the gate and the manifest with every file's hash."""
    export_onnx(model, manifest, staging / DRAFTER_NAME, config)
    # The tokenizer AutoTokenizer runs, not a copy of the drafter's file (see write_tokenizer).
    manifest = replace(manifest, special_tokens=write_tokenizer(Path(config.drafter_dir), staging))
    if config.gate_path is not None:
        copy_gate(Path(config.gate_path), staging)
    names = sorted(p.name for p in staging.iterdir() if p.is_file())
    manifest = replace(manifest, files=hash_files(staging, names))
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def copy_gate(gate_path: Path, out_dir: Path) -> None:
    """Put a gate graph into a bundle folder as ``gate.onnx``, with the ``gate.json`` beside it (version, report)."""
    shutil.copy(gate_path, out_dir / GATE_NAME)
    report_path = gate_path.with_name("gate.json")
    if report_path.is_file():
        shutil.copy(report_path, out_dir / report_path.name)


def write_tokenizer(drafter_dir: Path, out_dir: Path) -> dict[str, str]:
    """Write the bundle's ``tokenizer.json`` (and ``chat_template.jinja``); returns the special tokens.

    The file is the tokenizer ``AutoTokenizer`` actually runs, not a copy of the drafter's
    ``tokenizer.json``: transformers may rebuild parts of it from ``tokenizer_config.json``
    (the post-processor that adds BOS, or a model class's own normaliser and pre-tokenizer,
    as Qwen2's does), and the edge must encode as the user's pipeline does. The manifest's
    fingerprint stays that of the drafter's own file, which is what the verifier compares.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(drafter_dir)
    except (OSError, ValueError) as error:
        raise ExportError(f"AutoTokenizer cannot load {drafter_dir}: {error}") from error
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{drafter_dir}: AutoTokenizer gives a slow tokenizer; the edge needs a fast one")
    edge = Tokenizer.from_str(backend.to_str())
    edge.no_truncation()  # transformers applies these per call; the edge encodes whole prompts
    edge.no_padding()
    for probe in _TOKENIZER_PROBES:  # special tokens a tokenizer class adds in Python would show here
        want = list(auto(probe)["input_ids"])
        got = edge.encode(probe, add_special_tokens=True).ids
        if got != want:
            raise ExportError(f"the bundle's tokenizer encodes {probe!r} as {got}, AutoTokenizer as {want}")
    edge.save(str(out_dir / TOKENIZER_NAME))
    template = auto.chat_template
    if isinstance(template, dict):  # several named templates: the edge renders the default one
        template = template.get("default")
    if template:
        (out_dir / CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")
    return {name: value for name, value in auto.special_tokens_map.items() if isinstance(value, str)}


def export_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem export``."""
    config = ExportConfig(drafter_dir=args.drafter, out_dir=args.out, opset=args.opset, gate_path=args.gate)
    try:
        manifest, report = export_bundle(config)
    except (ExportError, BundleError) as error:
        logger.error("%s", error)
        print(f"tandem export: {error}")
        return 1
    print(f"edge bundle written to {config.out_dir}")
    m = manifest
    print(f"  family {m.family}, {m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}")
    print(f"  tokenizer {m.tokenizer_fingerprint}")
    print("  parity (max relative error vs PyTorch): " + ", ".join(f"{k} {v:.1e}" for k, v in report.logits.items()))
    return 0
