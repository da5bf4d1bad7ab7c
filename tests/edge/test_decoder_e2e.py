"""End to end over real sockets: edge decoder <-> gRPC verifier on port 0, tiny models of each family.

The drafter bundle is exported from a perturbed copy of the target, so drafts are often,
not always, accepted: both the accept and the reject/rollback paths run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.types import SamplingParams

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lossless_greedy_is_target_greedy(
    family: str, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Token for token the target's own greedy output, with and without pipelining."""
    address = verifier_for(family).address
    totals = {"accepted": 0, "drafted": 0, "stale": 0}
    for pipeline in (False, True):
        decoder = make_decoder(family, address, pipeline=pipeline, draft_length=4)
        for text in PROMPTS:
            result = lossless_greedy(decoder, family, text, 24, pipeline)
            s = result.stats
            assert s.mode_used == "lossless" and not s.fell_back_to_local
            assert s.num_generated == len(result.token_ids)
            assert s.num_target_passes == s.num_rounds - s.num_merged_frames <= s.num_generated
            assert s.bytes_up > 0 and s.bytes_down > 0 and s.bytes_up_per_token > 0
            assert result.text == decoder.tokenizer.decode(result.token_ids)
            totals["accepted"] += s.num_accepted
            totals["drafted"] += s.num_drafted
            totals["stale"] += s.num_stale_frames
    assert 0 < totals["accepted"] < totals["drafted"]  # both paths exercised
    assert totals["stale"] > 0  # pipelined frames were discarded after rejections, and output stayed exact


def test_cloud_mode_is_target_greedy(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], target_greedy: Any
) -> None:
    decoder = make_decoder("llama", verifier_for("llama").address, mode="cloud")
    prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
    result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=16))
    assert result.token_ids == target_greedy("llama", prompt, 16)
    assert result.stats.mode_used == "cloud" and result.stats.num_drafted == 0


def test_local_mode_is_drafter_greedy(
    make_decoder: Callable[..., HybridDecoder], tiny_model_dir: Callable[..., Any]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    decoder = make_decoder("llama", None, mode="local")
    prompt = decoder.tokenizer.encode_prompt(PROMPTS[1])
    result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=16))
    drafter = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", 1, 0.05)).eval()
    with torch.no_grad():
        expected = drafter.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert result.token_ids == tuple(expected[0, len(prompt) :].tolist())
    assert result.stats.mode_used == "local" and not result.stats.fell_back_to_local
    assert result.stats.bytes_up == 0 and result.stats.num_local_tokens == 16


def _pit_ks(
    target: Any, drafter: Any, prompt: tuple[int, ...], sequences: list[tuple[int, ...]], params: SamplingParams
) -> float:
    """Kolmogorov-Smirnov distance from uniform of the randomised PIT of every sampled token.

    Under the target's conditionals p(. | prefix) (Rosenblatt's transform), u = F(x-) + V p(x)
    with V ~ U(0, 1) is i.i.d. uniform over all positions of all sequences exactly when the
    sequences follow the target's joint distribution, whatever fixed order of the vocabulary
    F uses at each prefix. Ordering by the drafter/target ratio q/p makes the test sharp
    against the likeliest failure (output pulled toward the drafter's q): those samples
    crowd at the high end.
    """
    import torch

    from tandemspec.sampling import process_logits

    rng = np.random.default_rng(0)
    values = []
    with torch.no_grad():
        for tokens in sequences:
            ids = torch.tensor([[*prompt, *tokens]])
            rows = slice(len(prompt) - 1, -1)
            p = process_logits(target(ids).logits[0, rows].numpy(), params)  # [len(tokens), vocab]
            q = process_logits(drafter(ids).logits[0, rows].numpy(), params)  # [len(tokens), vocab]
            order = np.argsort(q / np.maximum(p, 1e-30), axis=-1, kind="stable")  # [len(tokens), vocab]
            for row, token in enumerate(tokens):
                ordered = p[row, order[row]]
                rank = int(np.flatnonzero(order[row] == token)[0])
                values.append(ordered[:rank].sum() + rng.random() * p[row, token])
    u = np.sort(np.asarray(values))
    n = len(u)
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def test_pipelined_sampling_follows_the_target_distribution(
    make_decoder: Callable[..., HybridDecoder],
    verifier_for: Callable[[str], Any],
    target_for: Callable[[str], Any],
    tiny_model_dir: Callable[..., Path],
) -> None:
    """Many seeds, 12 tokens each, pipelined (stale frames happen): the output follows the target.

    Two checks. The empirical distributions of the first token and of the second token
    (marginal) match the target's exact ones: for this prompt the drafter's first-token
    distribution is ~0.36 away (TV) from the target's; a correct sampler's expected TV is
    ~0.4 * sum_k sqrt(p_k (1 - p_k) / n), and the threshold sits at 0.6 * that sum (a few
    standard deviations above). And over all 12 positions, the randomised PIT under the
    target's conditionals is uniform (KS distance under its 0.1% critical value,
    1.95 / sqrt(N)), while the drafter's own samples fail the same test (power).
    """
    import torch

    from tandemspec.sampling import process_logits

    params = SamplingParams(temperature=1.0, top_k=20)
    address = verifier_for("llama").address
    decoder = make_decoder("llama", address, draft_length=3, pipeline=True)
    local = make_decoder("llama", None, mode="local")
    prompt = decoder.tokenizer.encode_prompt("import os\n")
    n, length = 300, 12
    samples, drafter_samples = [], []
    num_stale = 0
    for seed in range(n):
        sampling = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
        request = GenerationRequest(prompt_ids=prompt, max_new_tokens=length, sampling=sampling)
        result = decoder.generate(request)
        assert not result.stats.fell_back_to_local
        num_stale += result.stats.num_stale_frames
        samples.append(result.token_ids)
        if seed < 150:
            drafter_samples.append(local.generate(request).token_ids)
    assert num_stale > 0, "the test must exercise pipelined frames made stale by rejections"
    # A few stop early at EOS; the PIT takes every sampled token, EOS included.
    assert sum(len(s) == length for s in samples) > 0.9 * n
    target = target_for("llama")
    with torch.no_grad():
        first = process_logits(target(torch.tensor([prompt])).logits[0, -1].numpy(), params)  # [vocab]
        support = np.flatnonzero(first)
        batch = torch.tensor([[*prompt, int(t)] for t in support])
        second_given = process_logits(target(batch).logits[:, -1].numpy(), params)  # [support, vocab]
    second = (first[support, None] * second_given).sum(axis=0)  # [vocab]
    for position, exact in ((0, first), (1, second)):
        empirical = np.bincount([s[position] for s in samples], minlength=exact.shape[0]) / n
        assert np.all(empirical[exact == 0] == 0), f"token {position}: sampled outside the target's support"
        tv = 0.5 * np.abs(empirical - exact).sum()
        bound = 0.6 * np.sqrt(exact * (1 - exact) / n).sum()
        assert tv < bound, f"token {position}: TV {tv:.3f} >= {bound:.3f}"
    num_tokens = sum(len(s) for s in samples)
    from transformers import AutoModelForCausalLM

    drafter = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", 1, 0.05), dtype=torch.float32).eval()
    ks = _pit_ks(target, drafter, prompt, samples, params)
    assert ks < 1.95 / np.sqrt(num_tokens), f"KS {ks:.4f} over {num_tokens} tokens"
    drafter_ks = _pit_ks(target, drafter, prompt, drafter_samples, params)
    drafter_tokens = sum(len(s) for s in drafter_samples)
    assert drafter_ks > 1.95 / np.sqrt(drafter_tokens), f"no power: drafter KS {drafter_ks:.4f}"


def test_stop_string_cuts_the_text(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any]
) -> None:
    decoder = make_decoder("llama", verifier_for("llama").address)
    prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
    full = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=24))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop
    cut = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=24, stop_strings=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_device_log_gets_labels_and_target_top_k(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], tmp_path: Any
) -> None:
    from tandemspec.edge.devicelog import DeviceLog

    with DeviceLog(tmp_path / "device.db") as log:
        decoder = make_decoder("llama", verifier_for("llama").address, log=log, return_top_k=4)
        prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=12))
        rounds = list(log.iter_rounds())
    assert sum(len(r.tokens) for r in rounds) == result.stats.num_drafted
    assert sum(t.label for r in rounds for t in r.tokens) >= result.stats.num_accepted
    first = rounds[0]
    assert first.position == len(prompt) and first.context_ids == prompt and first.mode == "lossless"
    top = first.tokens[0].target_top_k
    assert top is not None and len(top.ids) == 4 and abs(sum(top.probs) - 1) < 1e-3
    assert first.tokens[0].features.shape == (4 + 64,)
    # the first draft token is accepted exactly when it is the target's argmax (greedy)
    assert first.tokens[0].label == (first.tokens[0].token_id == top.ids[0])


def test_cloud_mode_falls_back_when_the_verifier_stops(
    make_decoder: Callable[..., HybridDecoder], tiny_model_dir: Callable[..., Any], target_greedy: Any
) -> None:
    """A GENERATE session whose server goes away mid-stream: the drafter finishes the text."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    handle = serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), port=0))
    decoder = make_decoder("llama", handle.address, mode="cloud")
    prompt = decoder.tokenizer.encode_prompt(PROMPTS[1])
    streamed: list[int] = []

    def on_tokens(ids: list[int], text: str) -> None:
        streamed.extend(ids)
        if len(streamed) >= 5:
            handle.stop(0)

    try:
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=20), on_tokens)
    finally:
        handle.stop(0)
    k = result.stats.fallback_at_token
    assert result.stats.fell_back_to_local and 5 <= k < 20
    assert result.token_ids[:k] == target_greedy("llama", prompt, k)
    assert tuple(streamed) == result.token_ids and len(result.token_ids) == 20
