"""Many concurrent sessions batched into shared forward passes give exactly the unbatched results."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cloud_driver import DecodeStream, Drafter, SpecResult, open_message, speculate_greedy, target_greedy

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.cloud.target import ForwardRow, TargetModel

NUM_SESSIONS = 32
MAX_NEW = 16
DRAFT_LEN = 4


def oracle_drafter(reference: Sequence[int], vocab: int = 384) -> Drafter:
    """Drafts the reference continuation with every third position (by index) corrupted."""

    def draft(context: Sequence[int], k: int) -> list[int]:
        out = []
        for position in range(len(context), len(context) + k):
            token = reference[position] if position < len(reference) else 3
            out.append((token + 1) % vocab if position % 3 == 0 else token)
        return out

    return draft


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions must survive padding
def test_concurrent_sessions_are_batched_and_exact(
    family: str, tiny_model_dir: Callable[..., Path], load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    target_dir = tiny_model_dir(family, 0)
    model = load_model(target_dir)
    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(3, 384, size=int(rng.integers(2, 20)))) for _ in range(NUM_SESSIONS)]
    references = [target_greedy(model, prompt, MAX_NEW + 2 * DRAFT_LEN) for prompt in prompts]

    async def one(address: str, prompt: tuple[int, ...], reference: list[int], depth: int) -> SpecResult:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(prompt, fingerprint))
            return await speculate_greedy(stream, prompt, oracle_drafter(reference), DRAFT_LEN, MAX_NEW, depth)

    async def run(address: str) -> list[SpecResult]:
        return await asyncio.gather(
            *(one(address, p, r, depth=1 + i % 2) for i, (p, r) in enumerate(zip(prompts, references, strict=True)))
        )

    config = CloudConfig(model_dir=target_dir, batch_window_ms=20, max_batch_size=NUM_SESSIONS)
    with serve_in_thread(config) as server:
        results = asyncio.run(run(server.address))
        metrics = server.metrics.snapshot()

    for result, reference in zip(results, references, strict=True):
        assert result.tokens[: len(reference) - 2 * DRAFT_LEN] == reference[: len(reference) - 2 * DRAFT_LEN]
    assert metrics["batched_rows"] / metrics["step_passes"] > 4  # steps really were batched
    assert metrics["frames"] >= metrics["step_passes"]


def test_batched_forward_matches_single_rows(tiny_model_dir: Callable[..., Path]) -> None:
    """The padded batch computes each row as it would alone (logits and extended caches)."""
    for family in ("llama", "qwen2", "gpt2"):
        target = TargetModel.load(tiny_model_dir(family, 0), "cpu")
        rows = []
        for prompt, new in (((5, 9, 11, 40), (7, 8)), ((3,), (50, 51, 52)), ((6, 7, 8, 9, 10, 11), (12,))):
            rows.append(ForwardRow(target.prefill(prompt).kv, new))
        rows.append(ForwardRow(target.prefill((1,)).kv.crop(0), (4, 5)))  # an empty past in the batch
        batched = target.forward(rows)
        for row, out in zip(rows, batched, strict=True):
            alone = target.forward([row])[0]
            np.testing.assert_allclose(out.logits, alone.logits, atol=1e-4, rtol=1e-4)
            assert out.kv.length == alone.kv.length == row.kv.length + len(row.input_ids)
            for (k1, v1), (k2, v2) in zip(out.kv.layers, alone.kv.layers, strict=True):
                torch.testing.assert_close(k1, k2, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v1, v2, atol=1e-4, rtol=1e-4)
