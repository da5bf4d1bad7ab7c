"""Fixtures for the cloud verifier tests: one CPU thread, tiny targets and drafters, servers on port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The test machine has two slow shared cores: keep torch to one."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_model() -> Callable[[Path], Any]:
    """Factory: a saved tiny model folder -> the torch model (cached), for references and drafters."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path).eval()
        return cache[path]

    return load


@pytest.fixture(scope="session")
def llama_target_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama", 0)


@pytest.fixture(scope="session")
def fingerprint(llama_target_dir: Path) -> str:
    """All tiny models share the tiny tokenizer, so one fingerprint fits them all."""
    from tandemspec.fingerprint import tokenizer_fingerprint

    return tokenizer_fingerprint(llama_target_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def llama_server(llama_target_dir: Path) -> Iterator[Any]:
    """A verifier on the tiny Llama target with default settings (batching on)."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    with serve_in_thread(CloudConfig(model_dir=llama_target_dir)) as handle:
        yield handle
