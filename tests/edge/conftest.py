"""Fixtures for edge tests: exported tiny drafters, verifiers on port 0, decoders wired to them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.stats import GenerationResult
from tandemspec.edge.tokenizer import EdgeTokenizer


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Two slow shared cores: keep torch to one thread (only tests that need torch import it)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def drafter_for(tiny_bundle_dir: Callable[..., Path]) -> Callable[[str], tuple[OnnxDrafter, EdgeTokenizer]]:
    """Factory: family -> (a warmed-up drafter on its exported bundle, the bundle's tokenizer), cached."""
    cache: dict[str, tuple[OnnxDrafter, EdgeTokenizer]] = {}

    def make(family: str) -> tuple[OnnxDrafter, EdgeTokenizer]:
        if family not in cache:
            bundle = load_bundle(tiny_bundle_dir(family))
            options = DrafterOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)
            cache[family] = (OnnxDrafter(bundle, options), EdgeTokenizer.from_bundle(bundle))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def verifier_for(tiny_model_dir: Callable[..., Path]) -> Iterator[Callable[[str], Any]]:
    """Factory: family -> a running verifier (``serve_in_thread``) on the seed-0 target, one per family."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    handles: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in handles:
            handles[family] = serve_in_thread(CloudConfig(model_dir=tiny_model_dir(family, 0), port=0))
        return handles[family]

    yield get
    for handle in handles.values():
        handle.stop(0)


@pytest.fixture(scope="session")
def target_for(tiny_model_dir: Callable[..., Path]) -> Callable[[str], Any]:
    """Factory: family -> the seed-0 target as a torch model (the reference for exactness)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, Any] = {}

    def load(family: str) -> Any:
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family, 0)).eval()
        return cache[family]

    return load


@pytest.fixture
def make_decoder(
    drafter_for: Callable[[str], tuple[OnnxDrafter, EdgeTokenizer]],
) -> Callable[..., HybridDecoder]:
    """Factory: ``make_decoder(family, address=None, log=None, gate=None, **DecoderConfig fields)``."""

    def make(
        family: str, address: str | None = None, log: DeviceLog | None = None, gate: Any = None, **fields: Any
    ) -> HybridDecoder:
        drafter, tokenizer = drafter_for(family)
        client = VerifierClient(ClientConfig(address=address, recv_timeout_s=20.0)) if address else None
        return HybridDecoder(drafter, tokenizer, client, DecoderConfig(**fields), log, gate=gate)

    return make


@pytest.fixture(scope="session")
def target_greedy(target_for: Callable[[str], Any]) -> Callable[[str, tuple[int, ...], int], tuple[int, ...]]:
    """Factory: what the target alone generates greedily (transformers ``generate``, do_sample=False)."""

    def run(family: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
        import torch

        with torch.no_grad():
            out = target_for(family).generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
        return tuple(int(t) for t in out[0, len(prompt_ids) :])

    return run


@pytest.fixture
def lossless_greedy(
    target_greedy: Callable[[str, tuple[int, ...], int], tuple[int, ...]],
) -> Callable[..., GenerationResult]:
    """Factory: ``lossless_greedy(decoder, family, text, max_new_tokens, *context)`` continues ``text``
    greedily and asserts the output is the target's own (the lossless contract; ``context`` and
    ``text`` name the case when it is not); returns the result."""

    def run(decoder: HybridDecoder, family: str, text: str, max_new_tokens: int, *context: Any) -> GenerationResult:
        prompt = decoder.tokenizer.encode_prompt(text)
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=max_new_tokens))
        assert result.token_ids == target_greedy(family, prompt, max_new_tokens), (*context, text)
        return result

    return run
