"""Draft trees on the edge: batched branch steps of the ONNX drafter, EAGLE-2 growth, lossless decoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.edge.tree import TreeShape, grow_tree
from tandemspec.sampling import DraftTree
from tandemspec.types import SamplingParams

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")
PAIR = Path(__file__).resolve().parents[2] / "models" / "reference"


def test_branch_steps_equal_sequential_steps(drafter_for: Callable[[str], tuple[OnnxDrafter, EdgeTokenizer]]) -> None:
    """A batch of branches, each with its own ancestors, gives each path's logits as a plain extend would."""
    drafter = drafter_for("llama")[0].fork()
    prefix = [1, 45, 210, 17, 99]
    drafter.reset(prefix)
    first, first_hidden, first_kv = drafter.extend_branches([7, 8])  # two children of the prefix
    second, second_hidden, _ = drafter.extend_branches([9, 10], [np.stack([kv[0], kv[1]]) for kv in first_kv])
    for row, path in enumerate(([7], [8])):
        expected, hidden = drafter.extend(path)
        np.testing.assert_allclose(first[row], expected[-1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(first_hidden[row], hidden[-1], rtol=1e-4, atol=1e-4)
        drafter.rollback(len(prefix))
    for row, path in enumerate(([7, 9], [8, 10])):  # one under each
        expected, hidden = drafter.extend(path)
        np.testing.assert_allclose(second[row], expected[-1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(second_hidden[row], hidden[-1], rtol=1e-4, atol=1e-4)
        drafter.rollback(len(prefix))
    assert drafter.length == len(prefix)  # branches never enter the cache


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=50)])
def test_grown_tree_is_a_reranked_closed_tree(
    sampling: SamplingParams, drafter_for: Callable[[str], tuple[OnnxDrafter, EdgeTokenizer]]
) -> None:
    drafter, tokenizer = drafter_for("llama")
    drafter = drafter.fork()
    logits, _ = drafter.extend(tokenizer.encode_prompt(PROMPTS[1]))
    shape = TreeShape(budget=10, top_k=3, max_depth=5)
    tree = grow_tree(drafter, logits[-1], shape, sampling, 32, {2})
    assert len(tree.ids) == 10
    depths = DraftTree(tree.parents).depths()  # also asserts every parent precedes its child
    assert max(depths) <= 4
    children = DraftTree(tree.parents).children()
    for kids in children:
        assert len(kids) <= 3 and len({tree.ids[k] for k in kids}) == len(kids)  # distinct siblings
    # The context's children are the drafter's most likely tokens, most likely first.
    order = np.argsort(-logits[-1], kind="stable")
    assert [tree.ids[k] for k in children[0]] == order[: len(children[0])].tolist()
    if sampling.is_greedy:
        assert tree.dists == ()
    else:  # deterministic children: each sent with the point mass it was drawn from
        assert all(d.ids == (t,) and d.probs == (1.0,) for t, d in zip(tree.ids, tree.dists, strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lossless_greedy_trees_are_target_greedy(
    family: str, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Token for token the target's greedy output, with and without pipelining (a frame sent on the
    assumption that the previous tree's tip path is accepted, stale when it is not)."""
    num_stale = {}
    for pipeline in (False, True):
        decoder = make_decoder(
            family, verifier_for(family).address, tree_budget=8, tree_top_k=3, tree_depth=5, pipeline=pipeline
        )
        passes = generated = num_stale[pipeline] = 0
        for text in PROMPTS:
            result = lossless_greedy(decoder, family, text, 24, pipeline)
            s = result.stats
            assert s.mode_used == "lossless" and not s.fell_back_to_local
            assert s.num_rounds < s.num_drafted <= 8 * s.num_rounds  # trees of the budget at most (less near the end)
            passes += s.num_target_passes
            generated += s.num_generated
            num_stale[pipeline] += s.num_stale_frames
        assert passes < generated  # drafts were accepted
    assert num_stale[False] == 0 and num_stale[True] > 0


def test_tree_sampling_follows_the_target_distribution(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], target_for: Callable[[str], Any]
) -> None:
    """Many seeds through the edge with pipelined trees: the first two tokens follow the target's
    distributions (the bound of tests/edge/test_decoder_e2e.py's pipelined sampling test)."""
    import torch

    from tandemspec.sampling import process_logits

    params = SamplingParams(temperature=1.0, top_k=20)
    decoder = make_decoder("llama", verifier_for("llama").address, tree_budget=6, tree_top_k=3, tree_depth=3)
    prompt = decoder.tokenizer.encode_prompt("import os\n")
    n = 300
    samples = []
    for seed in range(n):
        sampling = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=2, sampling=sampling))
        assert not result.stats.fell_back_to_local
        samples.append(result.token_ids)
    target = target_for("llama")
    with torch.no_grad():
        first = process_logits(target(torch.tensor([prompt])).logits[0, -1].numpy(), params)  # [vocab]
        support = np.flatnonzero(first)
        batch = torch.tensor([[*prompt, int(t)] for t in support])
        second_given = process_logits(target(batch).logits[:, -1].numpy(), params)  # [support, vocab]
    second = (first[support, None] * second_given).sum(axis=0)
    for position, exact in ((0, first), (1, second)):
        tokens = [s[position] for s in samples if len(s) > position]
        empirical = np.bincount(tokens, minlength=exact.shape[0]) / len(tokens)
        assert np.all(empirical[exact == 0] == 0)
        bound = 0.6 * np.sqrt(exact * (1 - exact) / len(tokens)).sum()
        assert 0.5 * np.abs(empirical - exact).sum() < bound, position


@pytest.mark.skipif(not (PAIR / "edge" / "manifest.json").exists(), reason="reference pair not built")
def test_reference_pair_trees_are_target_greedy() -> None:
    """The bench prompts on the bundled pair: trees give the target's own greedy tokens, in fewer passes than chains."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tandemspec.bench.prompts import load_prompts
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

    target = AutoModelForCausalLM.from_pretrained(PAIR / "target", dtype=torch.float32).eval()
    new_tokens = 32
    passes = {}
    with serve_in_thread(CloudConfig(model_dir=PAIR / "target", port=0)) as server:
        for budget in (0, 16):
            config = EdgeConfig(cloud=server.address, bundle=PAIR / "edge", pipeline=False, tree_budget=budget)
            with EdgeRuntime(config) as runtime:
                passes[budget] = 0
                for text in load_prompts()[:2]:
                    prompt = runtime.tokenizer.encode_prompt(text)
                    result = runtime.decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens))
                    ids = torch.tensor([prompt])
                    with torch.no_grad():
                        out = target.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                    expected = out[0, len(prompt) :].tolist()
                    assert list(result.token_ids) == expected, budget
                    passes[budget] += result.stats.num_target_passes
    assert passes[16] < passes[0]


def test_a_verifier_without_trees_gets_chains(
    make_decoder: Callable[..., HybridDecoder],
    verifier_for: Callable[[str], Any],
    target_greedy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trees only go to a verifier whose Info says it checks them; an older one gets chains."""
    import dataclasses

    decoder = make_decoder("llama", verifier_for("llama").address, tree_budget=8, draft_length=3, pipeline=False)
    assert decoder.client is not None
    info = decoder.client.ensure_connected()
    assert "trees" in info.capabilities
    older = dataclasses.replace(info, capabilities=tuple(c for c in info.capabilities if c != "trees"))
    monkeypatch.setattr(decoder.client, "ensure_connected", lambda: older)
    prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
    result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=16))
    assert result.token_ids == target_greedy("llama", prompt, 16)
    assert result.stats.num_drafted <= 3 * result.stats.num_rounds  # chains of the draft length, no trees of 8


@pytest.mark.parametrize("pipeline", [False, True])
def test_greedy_tree_rounds_reach_the_device_log_as_the_greedy_chain_through_them(
    pipeline: bool, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], tmp_path: Path
) -> None:
    """Each tree round is logged as the greedy chain through the tree would have gone: the drafter's
    top token at each step along the accepted path, labelled by whether it is the target's token
    there, up to the first one the target rejects; the first step is the chain's own first token."""
    from tandemspec.edge.devicelog import DeviceLog

    address = verifier_for("llama").address
    with DeviceLog(tmp_path / "tree.db") as tree_log, DeviceLog(tmp_path / "chain.db") as chain_log:
        decoder = make_decoder(
            "llama", address, log=tree_log, tree_budget=8, tree_top_k=3, tree_depth=5, pipeline=pipeline
        )
        chain = make_decoder("llama", address, log=chain_log, draft_length=4, pipeline=False)
        prompt = decoder.tokenizer.encode_prompt(PROMPTS[1])
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=32))
        chain_result = chain.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=32))
        rounds = list(tree_log.iter_rounds())
        chain_first = next(chain_log.iter_rounds())
    assert result.token_ids == chain_result.token_ids  # both the target's greedy output
    assert result.stats.num_rounds > 1 and len(rounds) >= result.stats.num_rounds - 1  # at most a deferred last one
    output = list(prompt) + list(result.token_ids)
    labels = 0
    for record in rounds:
        assert record.mode == "lossless" and record.context_ids is None
        flags = [t.label for t in record.tokens]
        assert flags == [True] * (len(flags) - 1) + [flags[-1]]  # a chain: accepted, then at most one rejected
        for offset, token in enumerate(record.tokens):
            target = output[record.position + offset]
            assert token.label == (token.token_id == target) and not token.committed
            if not pipeline:
                assert token.features[3] == offset  # tokens since the last check (the gate's position feature)
        labels += sum(flags)
    assert 0 < labels <= result.stats.num_accepted  # a tree also accepts through siblings the chain never drafts
    first = rounds[0].tokens[0]
    assert rounds[0].position == chain_first.position == len(prompt)
    assert first.token_id == chain_first.tokens[0].token_id
    np.testing.assert_allclose(first.features, chain_first.tokens[0].features, rtol=1e-4, atol=1e-5)
