"""Choosing a frame's draft length (chains) or budget (trees) from measured costs (edge/autodraft.py):
the model, the estimates, and decoding with it through a real verifier behind the link emulator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.edge.autodraft import CostEstimator, Costs, Round, best_budget, best_length, tree_budgets
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder

PAIR = Path(__file__).resolve().parents[2] / "models" / "reference"
PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")


def _costs(rtt_s: float, acceptance: float, verify_s_per_token: float = 0.0) -> Costs:
    return Costs(
        rtt_s=rtt_s,
        draft_s_per_token=0.01,
        verify_s=0.02,
        verify_s_per_token=verify_s_per_token,
        acceptance=acceptance,
    )


def test_the_model_by_hand() -> None:
    """a = 0.5, d = 10 ms, a flat 20 ms pass: E(k) = 1.5, 1.75, 1.875, 1.9375; T(k) = 30 + 10 (k - 1) ms + R."""
    costs = _costs(rtt_s=0.2, acceptance=0.5)
    assert [costs.tokens_per_round(k) for k in (1, 2, 3, 4)] == pytest.approx([1.5, 1.75, 1.875, 1.9375])
    # R = 200 ms: 230/1.5 = 153, 240/1.75 = 137, 250/1.875 = 133, 260/1.9375 = 134 ms per token: k = 3.
    assert costs.seconds_per_token(3, pipelined=False) == pytest.approx(0.25 / 1.875)
    assert best_length(costs, 16, pipelined=False) == 3
    # With no round trip the cheapest frame wins: 30/1.5 = 20 < 40/1.75 = 22.9 ms per token.
    assert best_length(_costs(rtt_s=0.0, acceptance=0.5), 16, pipelined=False) == 1
    # Pipelined, a fully accepted frame's successor hides in its round trip: R / (1 + a^k).
    assert _costs(0.2, 0.5).seconds_per_round(1, pipelined=True) == pytest.approx(0.01 + 0.02 + 0.2 / 1.5)


def test_branch_hits_hide_round_trips_after_rejections() -> None:
    """With branch hit rate b, a round not accepted to its tip is followed by a frame already at the
    verifier with probability b: R / (1 + p + (1 - p) b) pipelined, unchanged synchronously."""
    import dataclasses

    costs = dataclasses.replace(_costs(0.2, 0.5), branch_hit_rate=0.4)
    p = 0.5  # a^k for k = 1
    assert costs.seconds_per_round(1, pipelined=True) == pytest.approx(0.03 + 0.2 / (1 + p + (1 - p) * 0.4))
    assert costs.seconds_per_round(1, pipelined=False) == pytest.approx(0.03 + 0.2)
    estimator = CostEstimator()
    assert estimator.costs().branch_hit_rate == 0.0  # no branches seen: the plain model
    for i in range(100):
        estimator.observe_branches(hit=i % 4 == 0)
    assert estimator.costs().branch_hit_rate == pytest.approx(0.25, abs=0.05)


def test_the_link_round_trip_is_kept_apart_from_the_verifiers_wait() -> None:
    estimator = CostEstimator()
    for _ in range(100):
        estimator.observe_rtt(0.05, link_seconds=0.01)  # 40 ms of each round waited for a batch
    costs = estimator.costs()
    assert costs.rtt_s == pytest.approx(0.05, rel=0.05) and costs.link_rtt_s == pytest.approx(0.01, rel=0.1)
    older = CostEstimator()
    older.observe_rtt(0.05)  # a verifier that does not report server_ms: the link is all of it
    assert older.costs().link_rtt_s == older.costs().rtt_s


def test_longer_drafts_for_longer_round_trips_and_better_drafters() -> None:
    for pipelined in (False, True):
        by_rtt = [best_length(_costs(rtt, 0.8), 16, pipelined) for rtt in (0.0, 0.02, 0.08, 0.3)]
        assert by_rtt == sorted(by_rtt) and by_rtt[0] < by_rtt[-1], by_rtt
        by_acceptance = [best_length(_costs(0.08, a), 16, pipelined) for a in (0.0, 0.5, 0.8, 0.95)]
        assert by_acceptance == sorted(by_acceptance) and by_acceptance[0] == 1 < by_acceptance[-1], by_acceptance
    # A pass that grows with the frame (a CPU target) shortens the choice.
    assert best_length(_costs(0.02, 0.8, 0.01), 16, False) < best_length(_costs(0.02, 0.8, 0.0), 16, False)
    assert best_length(_costs(1.0, 0.99), 5, False) == 5  # capped


def test_the_estimator_learns_the_costs() -> None:
    estimator = CostEstimator()
    for i in range(200):
        k = 2 if i % 2 else 14  # sizes 8 +- 6: a variance of 36 tokens^2
        # acceptance 0.75: per round 3 tokens accepted, then a rejection
        estimator.observe_round(k, 3, fully_accepted=False, compute_s=0.01 + 0.002 * k)
        estimator.observe_rtt(0.05)
        estimator.observe_draft(0.003 * k, k)
    costs = estimator.costs()
    assert costs.acceptance == pytest.approx(0.75, abs=0.01)
    assert costs.rtt_s == pytest.approx(0.05, rel=0.01)
    assert costs.draft_s_per_token == pytest.approx(0.003, rel=0.01)
    # The ridge prior (worth a variance of 4) shrinks the 2 ms-per-token slope by 36 / (36 + 4).
    slope = 0.002 * 36 / 40
    assert costs.verify_s_per_token == pytest.approx(slope, rel=0.02)
    assert costs.verify_s == pytest.approx(0.01 + 0.002 * 8 - slope * 8, rel=0.02)
    # One size only: the slope is unknown and taken as 0, the pass as its mean.
    flat = CostEstimator()
    for _ in range(50):
        flat.observe_round(4, 4, fully_accepted=True, compute_s=0.03)
    assert flat.costs().verify_s_per_token == 0.0 and flat.costs().verify_s == pytest.approx(0.03, rel=0.01)
    assert flat.costs().acceptance > 0.95
    # Exploration: one choice in eight is a neighbour of the best length.
    choices = [flat.choose(16, pipelined=True) for _ in range(32)]
    assert len(set(choices)) == 2


def test_auto_draft_is_lossless_and_drafts_longer_over_a_slower_link(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Through the link emulator at RTT 0 and 60 ms: the target's greedy output, pipelined and not, and
    synchronously a longer mean draft where the round trip is measured at 60 ms (pipelined, at this
    pair's acceptance of about 0.5, the model prefers frames of 1-2 tokens at both delays)."""
    upstream_port = int(verifier_for("llama").address.rsplit(":", 1)[1])
    mean_length = {}
    with run_in_thread("127.0.0.1", upstream_port) as link:
        for rtt_ms in (0.0, 60.0):
            link.set_link(LinkConfig(rtt_ms=rtt_ms))
            for pipeline in (False, True):
                decoder = make_decoder("llama", link.address, auto_draft=True, pipeline=pipeline)
                drafted = rounds = 0
                for text in PROMPTS:  # the second starts from the first's estimates
                    result = lossless_greedy(decoder, "llama", text, 24, rtt_ms, pipeline)
                    drafted += result.stats.num_drafted
                    rounds += result.stats.num_rounds
                mean_length[rtt_ms, pipeline] = drafted / rounds
                # the emulated delay, plus what gRPC and two shared cores add to a round trip
                assert 0.8 * rtt_ms / 1000 <= decoder.costs.costs().rtt_s < rtt_ms / 1000 + 0.1
    assert mean_length[60.0, False] > max(mean_length[0.0, False], 4.0), mean_length  # past the default length


def test_auto_draft_takes_trees() -> None:
    assert DecoderConfig(auto_draft=True, tree_budget=8).tree_budget == 8
    with pytest.raises(ValueError, match="auto_max_draft"):
        DecoderConfig(auto_draft=True, auto_max_draft=0)


def _tree(budget: int) -> tuple[int, ...]:
    """Two roots, then a chain under the first: the tip path is 0, 2, 3, ..., budget - 1 (budget - 1 levels)."""
    return (-1, -1, *(0 if j == 2 else j - 1 for j in range(2, budget)))


def test_the_tree_model_by_hand() -> None:
    """a = 0.5, d = 10 ms, c0 = 20 ms, c1 = 1 ms, top-k 2; budgets 2 and 16 measured, the others from the prior."""
    assert tree_budgets(16) == (2, 4, 8, 12, 16) and tree_budgets(10) == (2, 4, 8, 10) and tree_budgets(1) == (1,)
    # Nothing measured: a tree of 8 is priced as the chain of 4 (its likely depth): E, 4 d, a^4.
    assert Costs(0.0, 0.01, 0.02, 0.001, 0.5).tree(8) == Round(8, pytest.approx(1.9375), pytest.approx(0.04), 0.0625)
    measured = {2: Round(2, 1.6, 0.005, 0.3), 16: Round(16, 2.8, 0.03, 0.05)}
    costs = Costs(0.0, 0.01, 0.02, 0.001, 0.5, trees=measured, tree_top_k=2)
    assert costs.tree(16) == measured[16]
    # The prior scales the nearest measured budget by the chain model: 8 from 2 (chains of 4 and 1),
    # 12 from 16 (chains of 6 and 8).
    e = Costs(0.0, 0.01, 0.02, 0.001, 0.5).tokens_per_round
    assert costs.tree(8) == Round(8, pytest.approx(1.6 * e(4) / e(1)), pytest.approx(0.02), pytest.approx(0.0375))
    assert costs.tree(12) == Round(12, pytest.approx(2.8 * e(6) / e(8)), pytest.approx(0.0225), pytest.approx(0.2))
    # T = drafting + c0 + c1 B + h R: 2 -> 27 ms, 4 -> 34, 8 -> 48, 12 -> 54.5, 16 -> 66 (plus R)
    assert costs.round_seconds(costs.tree(16), pipelined=False) == pytest.approx(0.066)
    # R = 0: 27 / 1.6 = 16.9 ms per token (4: 18.2, 8: 23.2, 12: 19.6, 16: 23.6)
    assert best_budget(costs, 16, pipelined=False) == 2
    far = Costs(0.1, 0.01, 0.02, 0.001, 0.5, trees=measured, tree_top_k=2)
    # R = 100 ms: 2 -> 79.4, 4 -> 71.8, 8 -> 71.6, 12 -> 55.5, 16 -> 59.3 ms per token: 12, not yet measured
    assert far.per_token(far.tree(16), pipelined=False) == pytest.approx(0.166 / 2.8)
    assert best_budget(far, 16, pipelined=False) == 12
    # Pipelined the round trip is shared by a frame accepted to its tip: h = 1 / (1 + p(B)).
    assert far.round_seconds(far.tree(2), pipelined=True) == pytest.approx(0.027 + 0.1 / 1.3)
    assert best_budget(far, 16, pipelined=True) == 12  # 64.9, 64.8, 69.9, 49.5, 57.6 ms per token
    # Up to 10: the largest allowed joins the ladder; priced from 16, 53.9 ms per token.
    assert best_budget(far, 10, pipelined=False) == 10


def test_larger_trees_for_longer_round_trips() -> None:
    # A drafter right 0.8 of the time, a tree committing a little more than its tip chain, drafting
    # about one call per level; the verify pass grows 0.5 ms per token.
    for acceptance in (0.6, 0.8, 0.9):
        measured = {}
        for budget in (2, 4, 8, 12):
            prior = Costs(0.0, 0.003, 0.02, 0.0005, acceptance).tree_prior(budget)
            measured[budget] = Round(budget, prior.tokens + 0.05 * budget, prior.draft_s, prior.tip_rate)
        for pipelined in (False, True):
            chosen = [
                best_budget(Costs(rtt, 0.003, 0.02, 0.0005, acceptance, trees=measured), 32, pipelined)
                for rtt in (0.0, 0.01, 0.02, 0.05, 0.08, 0.2, 1.0)
            ]
            assert chosen == sorted(chosen) and chosen[0] < chosen[-1], (acceptance, pipelined, chosen)


def test_the_estimator_learns_tree_rounds() -> None:
    estimator = CostEstimator(tree_top_k=2)
    first = estimator.costs().tree(4)  # not measured yet: the prior
    for i in range(200):
        budget = 16 if i % 2 else 4  # sizes 10 +- 6: a variance of 36 tokens^2
        parents = _tree(budget)
        estimator.observe_tree_draft(parents, 0.002 * (budget - 1))  # 2 ms per level
        # 4: 2 accepted on the tip path (0, 2, 3), then a rejection, one round in four to the tip;
        # 16: 6 accepted on the tip path, then a rejection
        path = ((0, 2, 3) if i % 8 == 0 else (0, 2)) if budget == 4 else (0, *range(2, 7))
        estimator.observe_tree_round(parents, path, len(path) + 1, compute_s=0.01 + 0.002 * budget)
        estimator.observe_rtt(0.05)
    costs = estimator.costs()
    assert set(costs.trees) == {4, 16} and costs.tree(8) == costs.tree_prior(8)
    assert costs.trees[4].tokens == pytest.approx(3.25, abs=0.05) and costs.trees[16].tokens == pytest.approx(
        7.0, rel=0.01
    )
    assert costs.trees[4].draft_s == pytest.approx(0.006, rel=0.01) and costs.trees[16].draft_s == pytest.approx(
        0.03, rel=0.01
    )
    assert costs.trees[4].tip_rate == pytest.approx(0.25, abs=0.05) and costs.trees[16].tip_rate < 0.01
    assert costs.trees[4] != first
    assert costs.draft_s_per_token == pytest.approx(0.002, rel=0.01)  # per level, not per token
    # acceptance along the tip path: (2.25 + 6) accepted per (2.25 + 0.75 + 7) judged
    assert costs.acceptance == pytest.approx(8.25 / 10.0, abs=0.02)
    # tree frames feed the verify line: the ridge-shrunk 2 ms-per-token slope, as for chains
    slope = 0.002 * 36 / 40
    assert costs.verify_s_per_token == pytest.approx(slope, rel=0.02)
    assert costs.verify_s == pytest.approx(0.01 + 0.002 * 10 - slope * 10, rel=0.02)
    # The choice: 12, priced from 16 (not measured itself); one round in eight the next budget on
    # the ladder, alternately larger and smaller.
    choices = [estimator.choose_budget(16, pipelined=False) for _ in range(32)]
    assert choices.count(12) == 28 and [choices[i] for i in (7, 15, 23, 31)] == [16, 8, 16, 8], choices
    again = [estimator.choose_budget(16, pipelined=False) for _ in range(32)]
    assert again == choices  # no randomness: the same observations, the same choices (the rule repeats every 16)


def test_a_kept_continuation_feeds_its_subtree() -> None:
    """A continuation whose root the bonus committed: only that root's subtree was judged."""
    estimator = CostEstimator()
    for _ in range(100):  # root 0's subtree holds 2 and 3: a pass over 2 tokens
        estimator.observe_tree_round((-1, -1, 0, 2), (0, 2, 3), 3, known_root=0, compute_s=0.03)
        estimator.observe_tree_round((-1, -1, 0, 1, 3, 4), (1, 3), 1, known_root=1, compute_s=0.05)  # 3 tokens
    costs = estimator.costs()
    assert costs.verify_s_per_token == pytest.approx(0.02 * 0.25 / 4.25, rel=0.02)  # slope 20 ms per token, shrunk
    assert costs.trees[4].tokens == pytest.approx(3.0, abs=0.01) and costs.trees[4].tip_rate > 0.95
    assert costs.trees[6].tip_rate < 0.05


def test_smaller_budgets_are_seen_inside_a_greedy_tree() -> None:
    """A tree of 8 whose tokens are ranked by score: the trees of its 2 and 4 best tokens are judged too.

    Paths by rank: 0 -> 2 -> 4 -> 6 -> 7 is the likeliest (its end, node 7, the tip), node 1 a second
    root, 3 and 5 second children. Accepted: 0, 2, 4, 6 and a correction (5 tokens, tip missed). The
    tree of 2 ({0, 2}) would have reached its tip and got the bonus (3 tokens); the tree of 4 ({0, 1, 2, 4})
    likewise (4 tokens)."""
    parents, ranks = (-1, -1, 0, 0, 2, 1, 4, 6), (0, 2, 1, 4, 3, 5, 6, 7)
    greedy, sampled = CostEstimator(), CostEstimator()
    for _ in range(200):
        for estimator, given in ((greedy, ranks), (sampled, ())):
            estimator.observe_tree_draft(parents, 0.008)
            estimator.observe_tree_round(parents, (0, 2, 4, 6), 5, compute_s=0.02, ranks=given)
    costs = greedy.costs()
    assert {b: round(costs.trees[b].tokens, 2) for b in (2, 4, 8)} == {2: 3.0, 4: 4.0, 8: 5.0}
    assert {b: round(costs.trees[b].tip_rate, 2) for b in (2, 4, 8)} == {2: 1.0, 4: 1.0, 8: 0.0}
    # drafting: 8 ms for the tree's 5 levels, so 1.6 ms per level; the tree of 4 is 3 levels deep, of 2 two
    assert costs.draft_s_per_token == pytest.approx(0.0016, rel=1e-3)
    assert [costs.trees[b].draft_s for b in (2, 4, 8)] == pytest.approx([0.0032, 0.0048, 0.008], rel=1e-3)
    assert set(sampled.costs().trees) == {8}  # sampling: no ranks, only the tree sent


def test_ranks_nest_the_smaller_budgets_trees(drafter_for: Callable[[str], Any]) -> None:
    """The ``b`` best-ranked tokens of a grown tree are the tree a budget of ``b`` grows (as token paths)."""
    from tandemspec.edge.tree import TreeShape, grow_tree
    from tandemspec.types import SamplingParams

    drafter, tokenizer = drafter_for("llama")
    drafter = drafter.fork()

    def paths(row: Any, budget: int, keep: int) -> set[tuple[int, ...]]:
        tree = grow_tree(drafter, row, TreeShape(budget), SamplingParams(), 32, set())
        out, path_of = set(), {}
        for i, (token, parent) in enumerate(zip(tree.ids, tree.parents, strict=True)):
            path_of[i] = (*path_of.get(parent, ()), token)
            if tree.ranks[i] < keep:
                out.add(path_of[i])
        return out

    for text in PROMPTS:
        row, _ = drafter.reset(tokenizer.encode_prompt(text))  # the logits after the prompt
        for b in (2, 4, 8, 12):
            assert paths(row, 16, b) == paths(row, b, b), (text, b)


def test_auto_draft_trees_are_lossless_over_the_link(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """``auto_draft`` with a tree budget of 32 through the link emulator at RTT 0 and 60 ms: the target's
    greedy output, pipelined and not, with tree rounds measured and the round trip seen."""
    upstream_port = int(verifier_for("llama").address.rsplit(":", 1)[1])
    with run_in_thread("127.0.0.1", upstream_port) as link:
        for rtt_ms in (0.0, 60.0):
            link.set_link(LinkConfig(rtt_ms=rtt_ms))
            for pipeline in (False, True):
                decoder = make_decoder("llama", link.address, auto_draft=True, tree_budget=32, pipeline=pipeline)
                for text in PROMPTS:  # the second starts from the first's estimates
                    lossless_greedy(decoder, "llama", text, 24, rtt_ms, pipeline)
                costs = decoder.costs.costs()
                assert {2, 4} <= set(costs.trees), "tree rounds were measured"
                assert 0.8 * rtt_ms / 1000 <= costs.rtt_s < rtt_ms / 1000 + 0.1


@pytest.mark.skipif(not (PAIR / "edge" / "manifest.json").exists(), reason="reference pair not built")
def test_auto_draft_trees_grow_with_the_round_trip_on_the_reference_pair() -> None:
    """The bundled pair, whose trees commit more as they grow (to 16): synchronously, ``--auto-draft
    --tree-budget 16`` chooses larger budgets over a 60 ms link than over none, and stays lossless."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tandemspec.bench.prompts import load_prompts
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

    target = AutoModelForCausalLM.from_pretrained(PAIR / "target", dtype=torch.float32).eval()
    new_tokens, mean_budget = 32, {}
    with (
        serve_in_thread(CloudConfig(model_dir=PAIR / "target", port=0)) as server,
        run_in_thread(server.host, server.port) as link,
    ):
        for rtt_ms in (0.0, 60.0):
            link.set_link(LinkConfig(rtt_ms=rtt_ms))
            config = EdgeConfig(
                cloud=link.address, bundle=PAIR / "edge", pipeline=False, tree_budget=16, auto_draft=True
            )
            with EdgeRuntime(config) as runtime:
                drafted = rounds = 0
                for i, text in enumerate(load_prompts()[:5]):
                    prompt = runtime.tokenizer.encode_prompt(text)
                    request = GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens)
                    result = runtime.decoder.generate(request)
                    with torch.no_grad():
                        out = target.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
                    assert list(result.token_ids) == out[0, len(prompt) :].tolist(), (rtt_ms, text)
                    if i:  # after a first generation that measures the link
                        drafted += result.stats.num_drafted
                        rounds += result.stats.num_rounds
                mean_budget[rtt_ms] = drafted / rounds
    assert mean_budget[60.0] > mean_budget[0.0] + 1, mean_budget  # measured: about 4 against 6.5-11


def test_auto_draft_flag_reaches_the_decoder(tmp_path: Any) -> None:
    from tandemspec.cli import build_parser
    from tandemspec.edge.runtime import config_from_args

    for command in (["edge", "generate", "--prompt", "x"], ["edge", "serve"]):
        assert config_from_args(build_parser().parse_args([*command, "--auto-draft"])).auto_draft
        assert not config_from_args(build_parser().parse_args(command)).auto_draft
    toml = tmp_path / "tandem.toml"
    toml.write_text("[edge]\nauto_draft = true\n")
    assert config_from_args(build_parser().parse_args(["edge", "serve", "--config", str(toml)])).auto_draft
