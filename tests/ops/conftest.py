"""Fixtures for operations tests: a pool of verifier replicas on port 0 and edges pointed at all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import Backoff, ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer

FAMILY = "llama"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Two slow shared cores: keep torch to one thread."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def drafter(tiny_bundle_dir: Callable[..., Path]) -> tuple[OnnxDrafter, EdgeTokenizer]:
    """The tiny Llama drafter bundle, loaded once."""
    bundle = load_bundle(tiny_bundle_dir(FAMILY))
    options = DrafterOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)
    return OnnxDrafter(bundle, options), EdgeTokenizer.from_bundle(bundle)


@pytest.fixture
def start_replica(tiny_model_dir: Callable[..., Path]) -> Iterator[Callable[..., Any]]:
    """Factory: ``start_replica(**CloudConfig fields)`` -> a verifier on the tiny Llama target; all stopped after."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    handles: list[Any] = []

    def start(**fields: Any) -> Any:
        handles.append(serve_in_thread(CloudConfig(model_dir=tiny_model_dir(FAMILY, 0), **fields)))
        return handles[-1]

    yield start
    for handle in handles:
        handle.stop(0)


@pytest.fixture
def make_edge(drafter: tuple[OnnxDrafter, EdgeTokenizer]) -> Callable[..., HybridDecoder]:
    """Factory: ``make_edge(address, backoff=None, client=None, **DecoderConfig fields)`` -> a decoder
    (``client``: ClientConfig fields); ``address`` ``None`` = local only."""

    def make(
        address: str | None, backoff: Backoff | None = None, client: dict[str, Any] | None = None, **fields: Any
    ) -> HybridDecoder:
        onnx, tokenizer = drafter
        verifier = VerifierClient(ClientConfig(address=address, **(client or {})), backoff) if address else None
        return HybridDecoder(onnx, tokenizer, verifier, DecoderConfig(**fields))

    return make


@pytest.fixture(scope="session")
def target_greedy(tiny_model_dir: Callable[..., Path]) -> Callable[[tuple[int, ...], int], tuple[int, ...]]:
    """What the target alone generates greedily (transformers ``generate``): the lossless reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(FAMILY, 0)).eval()

    def run(prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
        return tuple(int(t) for t in out[0, len(prompt_ids) :])

    return run
