"""Reference-pair tooling: corpus split, tokenizer, resumable training, distillation losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tandemspec.federated.reference.corpus import split_corpus  # noqa: E402
from tandemspec.federated.reference.train import (  # noqa: E402
    ModelShape,
    StageSchedule,
    TokenStream,
    build_model,
    distill_loss,
    lm_loss,
    lr_at,
    run_stage,
)


def test_split_holds_out_email_and_drops_tests() -> None:
    split = split_corpus()
    assert all(path.relative_to(split.root).parts[0] == "email" for path in split.validation)
    for path in split.train:
        parts = path.relative_to(split.root).parts
        assert parts[0] != "email"
        assert not {"test", "tests", "idle_test"} & set(parts[:-1])
    assert split_corpus().train == split.train  # deterministic shuffle
    assert split_corpus(seed=1).train != split.train


def test_tokenizer_loads_with_auto_tokenizer(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_drafter_shape_has_a_fifth_of_target_compute() -> None:
    from tandemspec.federated.reference.train import TrainReferenceConfig

    config = TrainReferenceConfig(work_dir=Path("w"), out_dir=Path("o"))
    ratio = config.drafter.per_token_matmul_params(config.vocab_size) / config.target.per_token_matmul_params(
        config.vocab_size
    )
    assert ratio <= 0.2


def test_lr_schedule_warms_up_then_decays() -> None:
    schedule = StageSchedule(steps=100, batch_size=1, lr=1.0, warmup_steps=10)
    assert lr_at(0, schedule) == pytest.approx(0.1)
    assert lr_at(9, schedule) == pytest.approx(1.0)
    assert lr_at(99, schedule) < 0.11


def test_distill_losses_vanish_only_when_equal() -> None:
    logits = torch.randn(2, 3, 11)
    for objective in ("tvd", "fkl"):
        assert float(distill_loss(logits, logits, objective)) == pytest.approx(0.0, abs=1e-6)
        assert float(distill_loss(logits, logits.flip(-1), objective)) > 0.05


def _train(stage_dir: Path, crash_at: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ModelShape(32, 1, 2, 64), vocab_size=50, max_positions=64)
    stream = TokenStream(np.random.default_rng(0).integers(0, 50, size=2000).astype(np.uint16))
    schedule = StageSchedule(steps=6, batch_size=2, lr=1e-2, warmup_steps=1)

    def step_loss(step: int) -> tuple[torch.Tensor, int]:
        if step == crash_at:
            raise KeyboardInterrupt  # the process is stopped mid-stage
        batch = stream.windows(np.random.default_rng([0, step]), 2, 17)
        return lm_loss(model, batch), batch.numel()

    run_stage("t", model, schedule, step_loss, stage_dir, checkpoint_every=2)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupted_stage_resumes_to_the_same_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    uninterrupted = _train(tmp_path / "a", crash_at=None)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", crash_at=5)
    resumed = _train(tmp_path / "b", crash_at=None)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor)
