"""Draft trees: one target pass per tree, greedy and sampling verification over siblings, KV compaction.

The distribution test follows tests/tandemspec/test_sampling.py: the empirical total
variation of N draws over K outcomes exceeds 0.5 * sqrt(K / N) + sqrt(ln(1 / delta) / (2 N))
with probability at most delta for an exact sampler (McDiarmid), and the same test is shown
to reject a verifier that forgets the residual between siblings.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cloud_driver import DecodeStream, open_message, target_greedy

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.cloud.target import ForwardRow, TargetModel
from tandemspec.cloud.verify import verify_sampling as verify_on_device
from tandemspec.sampling import (
    DraftTree,
    TreeOps,
    accept_drafts,
    process_logits,
    residual_distribution,
    sample_dense,
    seeded_rng,
    truncate,
    verify_greedy,
    verify_sampling,
    walk_tree,
)
from tandemspec.types import DraftFrame, SamplingParams, SparseDist, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
# A tree of 7 draft tokens: two children of the context, a branch under the first, a chain under the second.
PARENTS = (-1, 0, 0, -1, 1, 4, 3)
DRAFT = (5, 6, 7, 8, 9, 10, 11)


def _path(parents: Sequence[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_one_tree_pass_equals_a_chain_pass_per_path(family: str, tiny_model_dir: Callable[..., Path]) -> None:
    """Every node's logits (alone and batched with a chain row of another session) are its path's
    as a chain, and the KV compacted to one path continues exactly like that chain."""
    target = TargetModel.load(tiny_model_dir(family, 0), device="cpu")
    kv = target.prefill(PROMPT[:-1]).kv
    fed = (PROMPT[-1], *DRAFT)
    fed_parents = (-1, *(0 if p < 0 else p + 1 for p in PARENTS))
    tree_row = ForwardRow(kv, fed, parents=fed_parents)
    alone = target.forward([tree_row])[0]
    batched = target.forward([tree_row, ForwardRow(target.prefill((1, 2, 3)).kv, (4, 5))])[0]
    for node in range(len(DRAFT)):
        chain = (PROMPT[-1], *(DRAFT[i] for i in _path(PARENTS, node)))
        expected = target.forward([ForwardRow(kv, chain)])[0].logits[-1]
        torch.testing.assert_close(alone.logits[node + 1], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batched.logits[node + 1], expected, rtol=1e-4, atol=1e-4)
    path = _path(PARENTS, 5)  # 0 -> 1 -> 4 -> 5: not a prefix of the frame, so a gather
    first = kv.length + 1
    compacted = alone.kv.select(first, [first + i for i in path[:-1]])
    assert compacted.length == kv.length + 1 + len(path) - 1
    after = target.forward([ForwardRow(compacted, (DRAFT[path[-1]],))])[0].logits[-1]
    chain = (PROMPT[-1], *(DRAFT[i] for i in path))
    torch.testing.assert_close(after, target.forward([ForwardRow(kv, chain)])[0].logits[-1], rtol=1e-4, atol=1e-4)


def test_greedy_tree_follows_the_first_matching_child() -> None:
    # Rows: 0 = context, i + 1 = after token i. Argmax: context -> 8, after 3 (token 8) -> 11.
    argmax = np.array([8, 0, 0, 0, 11, 0, 0, 99])
    judgement = verify_greedy(argmax, DRAFT, parents=PARENTS)
    assert judgement.path == (3, 6) and judgement.next_token == 99  # a leaf: the bonus after it
    assert judgement.labels == (False, False, False, True, False, False, True)
    # Token 6 (the tip) reached: fully accepted, so a continuation defers the bonus.
    assert verify_greedy(argmax, DRAFT, defer_bonus=True, parents=PARENTS).next_token is None
    # Stopping inside the tree gives the correction at that node's row.
    argmax[4] = 42
    stopped = verify_greedy(argmax, DRAFT, defer_bonus=True, parents=PARENTS)
    assert stopped.path == (3,) and stopped.next_token == 42
    # A chain written as parents is the chain.
    chain = (4, 7, 1)
    assert verify_greedy(np.array([4, 7, 9, 3]), chain, parents=(-1, 0, 1)) == verify_greedy(
        np.array([4, 7, 9, 3]), chain
    )


def _random_tree(rng: np.random.Generator, size: int) -> tuple[int, ...]:
    return tuple(int(rng.integers(-1, i)) for i in range(size))


def test_device_tree_walk_makes_the_numpy_decisions() -> None:
    """For the same seed the torch path accepts the same path and draws the same token as the numpy reference."""
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.0, top_k=20)
    depths = set()
    for trial in range(200):
        parents = _random_tree(rng, 6)
        p = process_logits(rng.normal(scale=2.0, size=(7, 40)), params)  # [k + 1, vocab]
        rows = DraftTree(parents).rows()
        dists = tuple(truncate(process_logits(rng.normal(scale=2.0, size=40), params), 6) for _ in parents)
        draft = tuple(int(np.random.default_rng(trial + i).choice(d.ids, p=d.probs)) for i, d in enumerate(dists))
        # Point masses too, as the edge sends for deterministic top-k children: at the row's likely tokens.
        if trial % 2:
            draft = tuple(int(np.argsort(-p[row])[i % 3]) for i, row in enumerate(rows))
            dists = tuple(SparseDist((token,), (1.0,)) for token in draft)
        frame = DraftFrame(seq=0, epoch=0, position=10, draft_ids=draft, draft_dists=dists, parents=parents)
        expected = verify_sampling(p, draft, dists, seeded_rng(trial, 10), parents=parents)
        got = verify_on_device(torch.from_numpy(p), frame, [(0, seeded_rng(trial, 10))], defer=False)
        assert got == expected, trial
        depths.add(len(got.path))
    assert {0, 1, 2} <= depths


def _tv_bound(num_outcomes: int, num_samples: int, delta: float = 1e-6) -> float:
    return 0.5 * math.sqrt(num_outcomes / num_samples) + math.sqrt(math.log(1 / delta) / (2 * num_samples))


def _first_two_tokens(
    p: np.ndarray, q: np.ndarray, seed: int, ops_residual: Callable[[np.ndarray, SparseDist], np.ndarray]
) -> tuple[int, int]:
    """One round on a two-level tree: three root children drawn from q without replacement (each
    with the q it was drawn from), each with two children likewise; returns the first two emitted tokens.

    ``p``: [vocab + 1 rows] the target's p after the context (row 0) and after each first token
    (row 1 + token); ``q``: likewise for the drafter.
    """
    rng = np.random.default_rng([seed, 1])
    parents: list[int] = []
    draft: list[int] = []
    dists: list[SparseDist] = []

    def children(parent: int, q_row: np.ndarray, count: int) -> list[int]:
        left = q_row.copy()
        made = []
        for _ in range(count):
            ids = np.flatnonzero(left)
            dist = SparseDist(tuple(int(i) for i in ids), tuple(float(x) for x in left[ids] / left[ids].sum()))
            token = int(dist.ids[rng.choice(len(dist.ids), p=dist.probs)])
            parents.append(parent)
            draft.append(token)
            dists.append(dist)
            made.append(len(draft) - 1)
            left[token] = 0.0  # without replacement: the next sibling's q lacks it
        return made

    for node in children(-1, q[0], 3):
        children(node, q[1 + draft[node]], 2)
    tree = DraftTree(tuple(parents))
    verify_rng = np.random.default_rng([seed, 2])
    uniforms = verify_rng.random(len(draft))
    target_rows = np.stack([p[0] if row == 0 else p[1 + draft[row - 1]] for row in range(len(draft) + 1)])
    p_draft = [float(target_rows[row, token]) for row, token in zip(tree.rows(), draft, strict=True)]
    labels = accept_drafts(p_draft, tuple(draft), tuple(dists), uniforms)
    ops = TreeOps(
        row=lambda row: target_rows[row],
        prob=lambda dist, token: float(dist[token]),
        residual=ops_residual,
        sample=lambda dist, row: sample_dense(dist, verify_rng),
    )
    judgement = walk_tree(tree, tuple(draft), tuple(dists), labels, uniforms, ops, defer_bonus=False)
    emitted = [draft[i] for i in judgement.path] + [judgement.next_token]
    if len(emitted) == 1:  # a rejection at the root: the second token is the target's own next draw
        emitted.append(sample_dense(p[1 + emitted[0]], verify_rng))
    return int(emitted[0]), int(emitted[1])


def test_tree_sampling_reproduces_the_target_distribution() -> None:
    """The first two tokens after a round on a branching tree follow the target's joint distribution."""
    vocab, num_draws = 5, 4000
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(vocab), size=vocab + 1)  # [1 + vocab, vocab]: after the context, after each token
    q = rng.dirichlet(np.ones(vocab), size=vocab + 1)
    joint = p[0][:, None] * p[1:]  # [vocab, vocab]: P(first, second)
    bound = _tv_bound(vocab * vocab, num_draws)

    def empirical(residual: Callable[[np.ndarray, SparseDist], np.ndarray]) -> np.ndarray:
        counts = np.zeros((vocab, vocab))
        for seed in range(num_draws):
            first, second = _first_two_tokens(p, q, seed, residual)
            counts[first, second] += 1
        return counts / num_draws

    exact = empirical(residual_distribution)
    assert 0.5 * np.abs(exact - joint).sum() < bound
    # Power: a verifier that tries each sibling against the unreduced p is measurably wrong.
    wrong = empirical(lambda dist, q_child: dist)
    assert 0.5 * np.abs(wrong - joint).sum() > 2 * bound
    assert 0.5 * np.abs(q[0][:, None] * q[1:] - joint).sum() > 2 * bound  # the drafter differs from the target


def _tree_drafter(model: Any) -> Callable[[Sequence[int]], tuple[tuple[int, ...], tuple[int, ...]]]:
    """A test-side tree: the drafter's top-2 after the context, 3 greedy tokens under the first, 2 under the second."""

    def greedy(ids: list[int], n: int) -> list[int]:
        out = []
        with torch.inference_mode():
            for _ in range(n):
                out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        return out

    def draft(context: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        with torch.inference_mode():
            first, second = model(torch.tensor([list(context)])).logits[0, -1].topk(2).indices.tolist()
        main = [first, *greedy([*context, first], 2)]
        other = [second, *greedy([*context, second], 1)]
        # Frame order: the second branch first, the main branch last, so its end is the tip.
        ids = (*other, *main)
        parents = (-1, 0, -1, 2, 3)
        return ids, parents

    return draft


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_tree_speculation_equals_target_greedy(
    family: str, tiny_model_dir: Callable[..., Path], load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    target_dir = tiny_model_dir(family, 0)
    drafter = _tree_drafter(load_model(tiny_model_dir(family, 1, 0.05)))
    max_new = 20
    expected = target_greedy(load_model(target_dir), PROMPT, max_new)

    async def run(address: str) -> tuple[list[int], list[Verdict]]:
        tokens, verdicts = list(PROMPT), []
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint))
            epoch = 0
            while len(tokens) - len(PROMPT) < max_new:
                ids, parents = drafter(tokens)
                frame = DraftFrame(seq=len(verdicts), epoch=epoch, position=len(tokens), draft_ids=ids, parents=parents)
                await stream.send(frame)
                verdict = await stream.receive()
                assert isinstance(verdict, Verdict) and not verdict.stale
                path = verdict.accepted_path
                assert all(parents[b] == a for a, b in zip((-1, *path), path, strict=False))  # a root-to-node path
                assert verdict.next_token is not None
                tokens += [ids[i] for i in path] + [verdict.next_token]
                assert verdict.committed_length == len(tokens)
                epoch = verdict.epoch
                verdicts.append(verdict)
            assert await stream.finish() == grpc.StatusCode.OK
        return tokens, verdicts

    with serve_in_thread(CloudConfig(model_dir=target_dir)) as server:
        tokens, verdicts = asyncio.run(run(server.address))
    assert tokens[: len(expected)] == expected
    # The main branch was accepted (its KV a gather, not a crop), which the verdict names since
    # it is no prefix of the frame.
    assert any(v.accepted_nodes[:1] == (2,) for v in verdicts)
