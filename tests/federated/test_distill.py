"""``tandem distill`` on a tiny random target: it trains, resumes exactly, and its reduced head exports."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

PAGE = "<html><head><title>t</title></head><body><div class='body'><p>{text}</p></div></body></html>"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def doc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few HTML pages standing in for the interpreter's documentation."""
    from tandemspec.federated.reference.corpus import read_texts, split_corpus

    root = tmp_path_factory.mktemp("docs")
    for index, text in enumerate(read_texts(split_corpus().train[:24])):
        (root / f"page{index}.html").write_text(PAGE.format(text=text[:3000].replace("<", " ")))
    return root


@pytest.fixture(scope="module")
def trained_target(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama after a few seconds of next-token training on stdlib code: a target with structure.

    A random target's next token is an arbitrary function of the context, which no drafter can
    learn from a few thousand tokens; a briefly trained one predicts like a (weak) language model.
    """
    import shutil

    import numpy as np
    import torch

    from tandemspec.federated.distill.teacher import load_target
    from tandemspec.federated.reference.corpus import read_texts, split_corpus
    from tandemspec.federated.reference.train import TokenStream, encode_documents, lm_loss

    source = tiny_model_dir("llama", 0)
    model = load_target(source).train()
    stream = TokenStream(encode_documents(source / "tokenizer.json", read_texts(split_corpus().train[:60])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        loss = lm_loss(model, stream.windows(np.random.default_rng([7, step]), 16, 49))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, out / name)
    return out


def _config(target: Path, tmp_path: Path, doc_root: Path, steps: int, name: str = "run"):  # type: ignore[no-untyped-def]
    from tandemspec.federated.distill.train import DistillConfig, DrafterShape

    return DistillConfig(
        target_dir=target,
        work_dir=tmp_path / name / "work",
        out_dir=tmp_path / name / "out",
        shape=DrafterShape(num_layers=1, draft_vocab_size=256),
        doc_root=doc_root,
        seq_len=48,
        rows_per_chunk=4,
        replay_chunks=2,
        answer_tokens=16,
        lr=3e-3,
        warmup_steps=2,
        max_steps=steps,
        eval_every_steps=10_000,
        eval_prompts=6,
        eval_answer_tokens=12,
        eval_windows=4,
        eval_accept_prompts=None,  # type: ignore[arg-type]
        checkpoint_every_s=1e9,
        log_every_steps=10_000,
        vocab_steps=8,
    )


def test_distill_raises_agreement_over_its_initialisation(trained_target: Path, tmp_path: Path, doc_root: Path) -> None:
    from tandemspec.federated.distill.train import Distiller

    distiller = Distiller(_config(trained_target, tmp_path, doc_root, steps=40))
    distiller.setup()
    before = distiller.evaluate(distiller.initial_drafter(), None)
    after = distiller.evaluate(distiller.train(), None)
    assert (
        after["agreement_chat"] + after["agreement_text"] > before["agreement_chat"] + before["agreement_text"] + 0.05
    )
    assert after["accepted_k4"] > before["accepted_k4"]
    drafter_dir = distiller.config.out_dir / "drafter"
    assert (drafter_dir / "committed.safetensors").stat().st_size < (drafter_dir / "model.safetensors").stat().st_size


def test_resumed_run_matches_an_uninterrupted_one(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, doc_root: Path
) -> None:
    """20 steps, stop, restart to 30 == 30 steps straight (weights equal)."""
    import torch

    from tandemspec.federated.distill.train import Distiller

    target = tiny_model_dir("llama", 0)
    straight = Distiller(_config(target, tmp_path, doc_root, steps=30, name="straight")).train()
    interrupted = _config(target, tmp_path, doc_root, steps=20, name="resumed")
    Distiller(interrupted).train()
    resumed = Distiller(dataclasses.replace(interrupted, max_steps=30)).train()
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_draft_head_is_exact_and_zero_outside(tiny_model_dir: Callable[..., Path]) -> None:
    """Full-vocabulary logits: the head's columns as computed, fill elsewhere (softmax exactly 0 there)."""
    import torch

    from tandemspec.federated.distill.model import DRAFT_FILL, draft_head_from_target
    from tandemspec.federated.distill.teacher import load_target

    target = load_target(tiny_model_dir("llama", 0))
    ids = torch.arange(0, 384, 3)
    drafter = draft_head_from_target(target, 2, ids)  # both layers: the head rows are the target's
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        full = drafter(input_ids=tokens).logits
        want = target(input_ids=tokens).logits
    torch.testing.assert_close(full[..., ids], want[..., ids])
    outside = torch.ones(384, dtype=torch.bool)
    outside[ids] = False
    assert torch.all(full[..., outside] == DRAFT_FILL)
    assert torch.all(torch.softmax(full, -1)[..., outside] == 0)


def test_distill_loss_is_zero_at_the_target_and_positive_elsewhere() -> None:
    import torch

    from tandemspec.federated.distill.train import distill_loss

    torch.manual_seed(0)
    head = torch.randn(2, 3, 10)
    log_q = torch.log_softmax(head, -1)
    top = log_q.topk(10, -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for objective in ("fkl", "tvd"):
        assert float(distill_loss(head, top.indices, top.values, mask, objective)) == pytest.approx(0, abs=1e-5)
        assert float(distill_loss(torch.randn(2, 3, 10), top.indices, top.values, mask, objective)) > 0.01


def test_reduced_head_bundle_matches_torch(
    tiny_model_dir: Callable[..., Path], tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """The exported graph keeps the bundle contract; the edge runtime reproduces the head (parity inside)."""
    import torch

    from tandemspec.edge.bundle import load_bundle
    from tandemspec.federated.distill.bundle import export_draft_bundle
    from tandemspec.federated.distill.model import draft_head_from_target, save_drafter
    from tandemspec.federated.distill.teacher import load_target

    target_dir = tiny_model_dir("llama", 0)
    drafter = draft_head_from_target(load_target(target_dir), 1, torch.arange(0, 384, 2))
    save_drafter(drafter, tmp_path / "drafter", tiny_tokenizer_dir, torch.float16)
    worst = export_draft_bundle(tmp_path / "drafter", tmp_path / "edge", tolerance=1e-4)
    assert worst < 1e-4
    assert load_bundle(tmp_path / "edge").manifest.vocab_size == 384


def test_chain_simulation_equals_the_reference_formula(tiny_model_dir: Callable[..., Path]) -> None:
    """The KV-cached simulation (drafting stops at the first mismatch) == the reference's generate-per-round one."""
    import torch

    from tandemspec.federated.distill.evaluate import HeldOutSet, mean_accepted_length
    from tandemspec.federated.distill.teacher import load_target
    from tandemspec.federated.reference.evaluate import greedy_continuation
    from tandemspec.federated.reference.evaluate import mean_accepted_length as reference_accepted_length

    target = load_target(tiny_model_dir("llama", 0))
    drafter = load_target(tiny_model_dir("llama", 1, 0.05))
    prompts = [torch.randint(3, 384, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    answers = [greedy_continuation(target, p, 24) for p in prompts]
    held_out = HeldOutSet([p[0].tolist() for p in prompts], answers, torch.zeros(0, 8).long(), torch.zeros(0, 8).long())
    for k in (2, 4, 6):
        want = reference_accepted_length(drafter, prompts, answers, k)
        assert mean_accepted_length(drafter, held_out, k) == pytest.approx(want)
        assert want > 1.2  # the drafter often agrees: the comparison exercises accepted runs and rollbacks


def test_distill_command_writes_drafter_report_bundle_and_card(
    trained_target: Path, tmp_path: Path, doc_root: Path
) -> None:
    """``tandem distill`` end to end: a few steps, then drafter/, edge/, report.json (with a baseline) and README.md."""
    import json

    from tandemspec.cli import main
    from tandemspec.edge.bundle import load_bundle

    out = tmp_path / "out"
    flags = ["--steps", "4", "--layers", "1", "--draft-vocab", "256", "--seq-len", "48", "--answer-tokens", "16"]
    flags += ["--eval-prompts", "4", "--eval-answer-tokens", "8", "--baselines", "1", "--doc-root", str(doc_root)]
    assert main(["distill", "--target", str(trained_target), "--out", str(out), *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [d["name"] for d in report["drafters"]] == ["distilled", "cut-layer, 1 layers, full head"]
    assert report["training"]["steps"] == 4
    assert all(d["ms_per_token_onnx"] > 0 for d in report["drafters"])
    assert load_bundle(out / "edge").manifest.vocab_size == 384
    assert "accepted length k=4" in (out / "README.md").read_text()
