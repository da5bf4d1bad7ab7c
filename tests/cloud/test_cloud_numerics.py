"""Numerics of the verifier's target: a pass over several tokens gives each position the logits a
one-token step gives it, so lossless output is cloud-only output token for token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tandemspec.cloud.target import ForwardRow, SessionKV, TargetModel, resolve_attention  # noqa: E402


def test_sixteen_bit_weights_on_a_cpu_get_eager_attention() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "eager"
    assert resolve_attention("auto", cpu, torch.float16) == "eager"
    assert resolve_attention("auto", cpu, torch.float32) is None  # the model's default (SDPA)
    assert resolve_attention("auto", cuda, torch.bfloat16) is None
    assert resolve_attention("sdpa", cpu, torch.bfloat16) == "sdpa"  # an explicit choice stands


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_pass_gives_the_logits_of_one_token_steps(
    family: str, dtype: str, tiny_model_dir: Callable[..., Path]
) -> None:
    """After a 40-token prefix, 17 tokens fed in passes of 1, 5 and 17: in bfloat16 (eager
    attention, the verifier's choice on a CPU) the logits are bitwise the same; in float32 within
    rounding far below the gaps between tokens."""
    target = TargetModel.load(tiny_model_dir(family, 0), "cpu", dtype)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 200, (40,), generator=generator).tolist()
    fed = torch.randint(3, 200, (17,), generator=generator).tolist()
    start = target.forward([ForwardRow(SessionKV.empty(), tuple(prefix), num_logits=0)])[0].kv
    by_size = {}
    for size in (1, 5, 17):
        kv, rows = start, []
        for at in range(0, len(fed), size):
            chunk = tuple(fed[at : at + size])
            output = target.forward([ForwardRow(kv, chunk, num_logits=len(chunk))])[0]
            kv = output.kv
            rows.append(output.logits)
        by_size[size] = torch.cat(rows)
    for size in (5, 17):
        if dtype == "bfloat16":
            assert torch.equal(by_size[size], by_size[1]), size
        else:
            torch.testing.assert_close(by_size[size], by_size[1], rtol=0, atol=1e-4)


def test_the_forward_runs_with_the_configured_threads_in_any_calling_thread(
    tiny_model_dir: Callable[..., Path],
) -> None:
    """torch's thread count is per calling thread: the scheduler's worker gets the target's own."""
    from concurrent.futures import ThreadPoolExecutor

    target = TargetModel.load(tiny_model_dir("llama", 0), "cpu", "float32", threads=1)
    row = ForwardRow(SessionKV.empty(), (5, 6, 7), num_logits=1)
    with ThreadPoolExecutor(1) as worker:
        worker.submit(torch.set_num_threads, 2).result()  # as a fresh thread on a 2-core machine may start
        worker.submit(target.forward, [row]).result()
        assert worker.submit(torch.get_num_threads).result() == 1
