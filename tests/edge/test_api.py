"""The OpenAI-compatible local API on a real uvicorn server, exercised with the ``openai`` client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandemspec.edge.api import ApiHandle, start_api_in_thread
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def api(
    tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]
) -> Iterator[tuple[ApiHandle, EdgeRuntime]]:
    config = EdgeConfig(cloud=verifier_for("llama").address, bundle=tiny_bundle_dir("llama"), threads=1)
    with EdgeRuntime(config) as runtime, start_api_in_thread(runtime) as handle:
        yield handle, runtime


def test_completions_streamed_and_not(api: tuple[ApiHandle, EdgeRuntime], target_greedy: Any) -> None:
    from openai import OpenAI

    handle, runtime = api
    client = OpenAI(base_url=handle.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    expected = runtime.tokenizer.decode(target_greedy("llama", runtime.tokenizer.encode_prompt(PROMPT), 12))

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    stats = completion.model_extra["tandem_stats"] if completion.model_extra else {}
    assert stats["mode_used"] == "lossless" and stats["num_generated"] == 12

    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert len([c for c in chunks if c.choices[0].text]) > 1  # token by token, not one blob
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_not(api: tuple[ApiHandle, EdgeRuntime]) -> None:
    from openai import OpenAI

    handle, _ = api
    client = OpenAI(base_url=handle.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages: Any = [{"role": "user", "content": "write a loop"}]
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and text is not None
    chunks = list(
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert [c.choices[0].delta.role for c in chunks if c.choices[0].delta.role] == ["assistant"]  # first chunk only


def test_health_metrics_and_bad_input(api: tuple[ApiHandle, EdgeRuntime]) -> None:
    handle, _ = api
    with httpx.Client(base_url=handle.base_url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 3, "temperature": 0, "mode": "local"})
        metrics = http.get("/metrics").text
        assert "tandem_edge_generated_tokens_total" in metrics and 'mode="local"' in metrics
        assert http.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
        assert http.post("/v1/completions", json={"prompt": ["a", "b"]}).status_code == 400


def test_gated_requests(
    api: tuple[ApiHandle, EdgeRuntime], tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]
) -> None:
    """A request may ask for ``gated``: refused with 400 when the edge has no gate, served when it has one."""
    handle, _ = api  # the tiny bundle has no gate.onnx, and no baseline was configured
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "mode": "gated"}
    with httpx.Client(base_url=handle.base_url, timeout=60) as http:
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 400 and "gate" in refused.json()["error"]["message"]
    config = EdgeConfig(
        cloud=verifier_for("llama").address,
        bundle=tiny_bundle_dir("llama"),
        threads=1,
        gate_kind="top1",
        gate_threshold=0.0,
        gate_check_every=0,
    )
    with EdgeRuntime(config) as runtime, start_api_in_thread(runtime) as gated, httpx.Client(timeout=60) as http:
        reply = http.post(gated.base_url + "/v1/completions", json=body).json()
        stats = reply["tandem_stats"]
        assert stats["mode_used"] == "gated" and stats["num_trusted"] == 6 and stats["num_drafted"] == 0
