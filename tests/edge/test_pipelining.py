"""Pipelining that keeps the bonus, through the edge's decoder and a real verifier (tiny families).

The bonus rule (greedy): a pipelined frame's verdict brings its bonus, and the frame after it
stays live only when its tip path starts with that bonus. A merged continuation: a frame that
reaches the verifier while its predecessor's step still waits shares that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.fingerprint import tokenizer_fingerprint
from tandemspec.types import SamplingParams, SessionClose, SessionOpen, SessionReady

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")
MERGE_WINDOW_MS = 150.0  # with a second, idle session open every step waits this long: its continuation arrives


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_kept_bonus_is_lossless_and_saves_passes(
    family: str, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Pipelined greedy chains and trees, bonus kept or deferred: the target's greedy output either way, and
    keeping it spends fewer target passes (a continuation that misses the bonus costs none)."""
    address = verifier_for(family).address
    saved = kept = 0
    for tree_budget in (0, 8):
        passes = {}
        for keep_bonus in (False, True):
            # no branches (a kept bonus would enable them): the two differ in the bonus rule only
            decoder = make_decoder(
                family,
                address,
                pipeline=True,
                draft_length=4,
                tree_budget=tree_budget,
                keep_bonus=keep_bonus,
                branches=0,
            )
            passes[keep_bonus] = 0
            for text in PROMPTS:
                result = lossless_greedy(decoder, family, text, 24, keep_bonus, tree_budget)
                s = result.stats
                assert not s.fell_back_to_local and s.num_target_passes == s.num_rounds - s.num_merged_frames
                passes[keep_bonus] += s.num_target_passes
                kept += s.num_bonus_kept if keep_bonus else 0
                if not keep_bonus:
                    assert s.num_bonus_kept == 0
        # A continuation that starts with the bonus costs what it did; one that misses it costs no pass.
        assert passes[True] <= passes[False], (tree_budget, passes)
        saved += passes[False] - passes[True]
    assert kept > 0 and saved > 0


@contextmanager
def _merging_verifier(model_dir: Path) -> Iterator[str]:
    """A verifier whose every step waits ``MERGE_WINDOW_MS`` (a second session is open and silent)."""
    with serve_in_thread(CloudConfig(model_dir=model_dir, batch_window_ms=MERGE_WINDOW_MS)) as server:
        client = VerifierClient(ClientConfig(address=server.address))
        stream = client.open_stream()
        fingerprint = tokenizer_fingerprint(model_dir / "tokenizer.json")
        stream.send(
            SessionOpen(
                prompt_ids=(1, 2, 3), sampling=SamplingParams(), max_new_tokens=8, tokenizer_fingerprint=fingerprint
            )
        )
        assert isinstance(stream.recv(), SessionReady)
        try:
            yield server.address
        finally:
            stream.send(SessionClose(reason="stop"))
            stream.close()
            client.close()


def test_merged_continuations_through_the_edge(
    make_decoder: Callable[..., HybridDecoder],
    verifier_for: Callable[[str], Any],
    tiny_model_dir: Callable[..., Path],
    lossless_greedy: Any,
) -> None:
    """Greedy chains and trees with merged passes give the target's greedy output and count the passes
    saved; sampling with merged passes makes, seed for seed, the output of the same decoding without
    them (each merged part keeps its random stream), so the distribution tests carry over."""
    plain = verifier_for("llama").address
    with _merging_verifier(tiny_model_dir("llama", 0)) as merging:
        for tree_budget in (0, 8):
            decoder = make_decoder("llama", merging, pipeline=True, draft_length=3, tree_budget=tree_budget)
            merged = 0
            for text in PROMPTS:
                result = lossless_greedy(decoder, "llama", text, 16, tree_budget)
                s = result.stats
                assert s.num_target_passes == s.num_rounds - s.num_merged_frames
                merged += s.num_merged_frames
            assert merged > 0, tree_budget
        prompt = decoder.tokenizer.encode_prompt("import os\n")
        merged = 0
        for tree_budget in (0, 6):
            outputs = {}
            for address in (plain, merging):
                decoder = make_decoder("llama", address, pipeline=True, draft_length=3, tree_budget=tree_budget)
                outputs[address] = []
                for seed in range(4):
                    sampling = SamplingParams(temperature=1.0, top_k=20, seed=seed)
                    result = decoder.generate(
                        GenerationRequest(prompt_ids=prompt, max_new_tokens=10, sampling=sampling)
                    )
                    outputs[address].append(result.token_ids)
                    merged += result.stats.num_merged_frames if address == merging else 0
            assert outputs[plain] == outputs[merging], tree_budget
        assert merged > 0
