"""The edge bundle: a versioned folder with ``drafter.onnx``, ``tokenizer.json`` and ``manifest.json``.

It may also carry ``gate.onnx`` (and its ``gate.json``) and ``chat_template.jinja``, the
drafter's own chat template. ``tokenizer.json`` encodes exactly as the model's
``AutoTokenizer`` does (``tandem export`` writes the post-processor transformers uses, so
special tokens such as BOS are added where the model's own pipeline adds them), and the
manifest's ``special_tokens`` are the template's variables (``bos_token``, ``eos_token``...).

``tandem export`` writes bundles (``tandemspec.federated.export``); the edge loads and
validates them here without torch. The manifest records what the runtime needs to size
its buffers (layers, KV heads, head dim, max positions), the special token ids, the
tokenizer fingerprint the verifier must match, and a sha256 of every file so that a
half-copied or tampered bundle is refused instead of producing garbage.

Graph contract of ``drafter.onnx`` (``kv_layout = "bshd-new"``):

inputs
    ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, total] int64 (total =
    past + seq), ``position_ids`` [batch, seq] int64, and per layer ``past.{i}.key`` and
    ``past.{i}.value`` [batch, past, kv_heads, head_dim] float32.
outputs
    ``logits`` [batch, seq, vocab], ``hidden`` [batch, seq, hidden] (the final, normed
    hidden state, for the gate), and per layer ``present.{i}.key`` / ``present.{i}.value``
    [batch, seq, kv_heads, head_dim]: the keys and values of the *new* tokens only, so the
    runtime appends them into a preallocated buffer and rolls back by moving a length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandemspec.models import reference_dir

logger = logging.getLogger(__name__)

BUNDLE_VERSION = 1
MANIFEST_NAME = "manifest.json"
DRAFTER_NAME = "drafter.onnx"
TOKENIZER_NAME = "tokenizer.json"
GATE_NAME = "gate.onnx"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
KV_LAYOUT = "bshd-new"
_HASH_CHUNK_BYTES = 1 << 20


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or of an unsupported version."""


@dataclass(frozen=True)
class BundleManifest:
    """What ``manifest.json`` holds (see the module docstring for the graph contract)."""

    bundle_version: int
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    opset: int
    tokenizer_fingerprint: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    kv_layout: str = KV_LAYOUT
    source: str = ""  # where the drafter came from (folder name), informational
    model_version: str = ""  # bumped by federated publishing
    # The tokenizer's special tokens by name ("bos_token": "<s>", ...): the chat template's variables.
    special_tokens: dict[str, str] = field(default_factory=dict)
    weights: str = "float32"  # the drafter graph's weights: "float32", or "int8" after `tandem quantize`

    @property
    def version_label(self) -> str:
        """The name responses, ``/health`` and metrics give this bundle: its published version
        (``v0003``), or for an unpublished bundle a digest of its file hashes."""
        if self.model_version:
            return self.model_version
        digest = hashlib.sha256(json.dumps(self.files, sort_keys=True).encode("utf-8")).hexdigest()
        return f"sha256:{digest[:12]}"

    def to_json(self) -> str:
        """Serialise as pretty JSON (stable key order)."""
        data = asdict(self)
        data["eos_ids"] = list(self.eos_ids)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        """Parse ``manifest.json``; raises :class:`BundleError` on missing or malformed fields."""
        try:
            data: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as error:
            raise BundleError(f"manifest is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise BundleError("manifest must be a JSON object")
        version = data.get("bundle_version")
        if version != BUNDLE_VERSION:
            raise BundleError(f"unsupported bundle version {version!r} (this edge reads {BUNDLE_VERSION})")
        if data.get("kv_layout", KV_LAYOUT) != KV_LAYOUT:
            raise BundleError(f"unsupported KV layout {data.get('kv_layout')!r} (expected {KV_LAYOUT})")
        known = set(cls.__dataclass_fields__)
        try:
            kwargs = {key: value for key, value in data.items() if key in known}
            kwargs["eos_ids"] = tuple(int(i) for i in data.get("eos_ids", ()))
            kwargs["files"] = {str(k): str(v) for k, v in data.get("files", {}).items()}
            kwargs["special_tokens"] = {str(k): str(v) for k, v in data.get("special_tokens", {}).items()}
            manifest = cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise BundleError(f"malformed manifest: {error}") from error
        _check_dims(manifest)
        return manifest


def _check_dims(manifest: BundleManifest) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_kv_heads", "head_dim", "max_positions"):
        value = getattr(manifest, name)
        if not isinstance(value, int) or value <= 0:
            raise BundleError(f"manifest field {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Bundle:
    """A validated bundle folder."""

    path: Path
    manifest: BundleManifest

    @property
    def drafter_path(self) -> Path:
        return self.path / DRAFTER_NAME

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_NAME

    @property
    def gate_path(self) -> Path | None:
        """``gate.onnx`` when the bundle carries a gate."""
        return self.path / GATE_NAME if GATE_NAME in self.manifest.files else None

    @property
    def chat_template_path(self) -> Path | None:
        """``chat_template.jinja`` when the drafter came with a chat template."""
        return self.path / CHAT_TEMPLATE_NAME if CHAT_TEMPLATE_NAME in self.manifest.files else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def staged_bundle(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` to build a bundle in; a clean exit replaces ``out_dir`` by it in one rename.

    Only an absent folder, an empty one or an earlier bundle may be replaced (checked on
    entry and again before the rename); on an error the staging folder is removed.
    """
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a published bundle is readable like any folder
    try:
        yield staging
        _check_replaceable(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise BundleError(f"{out_dir} exists and is not an edge bundle; refusing to overwrite it")


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` for the given files of ``folder``."""
    return {name: sha256_file(folder / name) for name in sorted(names)}


def load_bundle(path: Path, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle folder; raises :class:`BundleError` with the reason."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an edge bundle (no {MANIFEST_NAME}); build one with `tandem export`")
    manifest = BundleManifest.from_json(manifest_path.read_text(encoding="utf-8"))
    for required in (DRAFTER_NAME, TOKENIZER_NAME):
        if required not in manifest.files:
            raise BundleError(f"{manifest_path}: file list lacks {required}")
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing")
        if verify_hashes and sha256_file(file_path) != expected:
            raise BundleError(f"bundle {path}: {name} does not match its sha256 in the manifest")
    logger.info(
        "loaded bundle %s (%s, %d layers, vocab %d)", path, manifest.family, manifest.num_layers, manifest.vocab_size
    )
    return Bundle(path=path, manifest=manifest)


def default_bundle_dir() -> Path:
    """The bundled reference edge bundle (``models/reference/edge``, installed as ``tandemspec.models``)."""
    return reference_dir() / "edge"
