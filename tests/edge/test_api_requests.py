"""The local API honours OpenAI's request fields and answers bad ones with the right status.

A real uvicorn server with a real verifier; requests through httpx (raw JSON where the
``openai`` client would refuse to send it) and the ``openai`` client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandemspec.edge.api import ApiHandle, start_api_in_thread
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

MAX_REQUEST_TOKENS = 40
CHAT = [{"role": "user", "content": "write a loop"}]


@pytest.fixture(scope="module")
def api(tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]) -> Iterator[ApiHandle]:
    config = EdgeConfig(
        cloud=verifier_for("llama").address,
        bundle=tiny_bundle_dir("llama"),
        threads=1,
        max_request_tokens=MAX_REQUEST_TOKENS,
    )
    with EdgeRuntime(config) as runtime, start_api_in_thread(runtime) as handle:
        yield handle


@pytest.fixture
def http(api: ApiHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.base_url, timeout=60) as client:
        yield client


def _raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST a JSON text as is (``Infinity``, ``NaN`` and lone surrogates are valid to Python's parser)."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


def test_non_finite_sampling_is_400_and_the_next_request_still_reaches_the_verifier(http: httpx.Client) -> None:
    for field in ('"temperature": Infinity', '"temperature": NaN', '"top_p": NaN', '"top_p": -Infinity'):
        refused = _raw(http, "/v1/completions", '{"prompt": "x = ", "max_tokens": 4, ' + field + "}")
        assert refused.status_code == 400, field
        assert refused.json()["error"]["type"] == "invalid_request_error"
    reply = http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 4, "temperature": 0}).json()
    assert reply["tandem_stats"]["mode_used"] == "lossless" and not reply["tandem_stats"]["fell_back_to_local"]


def test_lone_surrogates_are_400(http: httpx.Client) -> None:
    assert _raw(http, "/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}').status_code == 400
    chat = '{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'
    assert _raw(http, "/v1/chat/completions", chat).status_code == 400
    stop = '{"prompt": "x", "max_tokens": 2, "stop": ["\\ud800"]}'
    assert _raw(http, "/v1/completions", stop).status_code == 400
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_models_content_parts_and_unknown_fields(api: ApiHandle, http: httpx.Client) -> None:
    model = http.get("/v1/models").json()["data"][0]["id"]
    body = {"messages": CHAT, "max_tokens": 3, "temperature": 0, "logit_bias": {}}  # unknown fields are ignored
    assert http.post("/v1/chat/completions", json={**body, "model": model}).status_code == 200
    assert http.post("/v1/chat/completions", json=body).status_code == 200  # no model: the one served
    unknown = http.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "hi"}]
    refused = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": image}]})
    assert refused.status_code == 400 and "image_url" in refused.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json={**body, "messages": []}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 400


def test_token_limits(http: httpx.Client) -> None:
    base = {"messages": CHAT, "temperature": 0, "mode": "local"}
    reply = http.post("/v1/chat/completions", json={**base, "max_completion_tokens": 5}).json()
    assert reply["usage"]["completion_tokens"] == 5 or reply["choices"][0]["finish_reason"] == "stop"
    unbounded = http.post("/v1/chat/completions", json=base).json()  # chat default: up to the daemon's bound
    finish, used = unbounded["choices"][0]["finish_reason"], unbounded["usage"]["completion_tokens"]
    assert (finish, used) == ("length", MAX_REQUEST_TOKENS) or (finish == "stop" and used < MAX_REQUEST_TOKENS)
    completion = http.post("/v1/completions", json={"prompt": "x = ", "temperature": 0, "mode": "local"}).json()
    assert completion["usage"]["completion_tokens"] <= 16  # OpenAI's completions default
    for field in ("max_tokens", "max_completion_tokens"):
        refused = http.post("/v1/chat/completions", json={**base, field: MAX_REQUEST_TOKENS + 1})
        assert refused.status_code == 400 and str(MAX_REQUEST_TOKENS) in refused.json()["error"]["message"]


def test_sampling_without_a_seed_is_random_and_with_one_reproducible(http: httpx.Client) -> None:
    body = {"prompt": "def ", "max_tokens": 24, "temperature": 2.0}
    unseeded = {http.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(4)}
    assert len(unseeded) > 1
    seeded = [http.post("/v1/completions", json={**body, "seed": 123}).json() for _ in range(2)]
    assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]
    assert seeded[0]["tandem_stats"]["mode_used"] == "lossless"  # edge and verifier used the same seed


def test_stream_usage_and_role(api: ApiHandle) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=api.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(
        client.chat.completions.create(
            model=client.models.list().data[0].id, messages=CHAT, max_tokens=6, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert [bool(c.choices[0].delta.role) for c in chunks[:-1]] == [True] + [False] * (len(chunks) - 2)
    assert 0 < chunks[-1].usage.completion_tokens <= 6
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_a_request_past_its_timeout_is_504_and_cancelled(
    tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]
) -> None:
    import threading

    config = EdgeConfig(cloud=verifier_for("llama").address, bundle=tiny_bundle_dir("llama"), threads=1,
                        request_timeout_s=0.3, max_concurrent=1)  # fmt: skip
    with EdgeRuntime(config) as runtime:
        real = runtime.decoder
        release = threading.Event()
        outcomes: list[str] = []

        class Slow:
            """The real decoder, its token callback held until ``release`` (a generation slower than the timeout)."""

            def generate(self, request: Any, on_tokens: Any = None) -> Any:
                def held(ids: list[int], text: str) -> None:
                    release.wait(10)
                    on_tokens(ids, text)

                try:
                    result = real.generate(request, held)
                except Exception as error:
                    outcomes.append(type(error).__name__)
                    raise
                outcomes.append("finished")
                return result

        runtime.decoder = Slow()  # type: ignore[assignment]
        with start_api_in_thread(runtime) as handle, httpx.Client(base_url=handle.base_url, timeout=60) as http:
            body = {"prompt": "x = ", "max_tokens": 8, "temperature": 0}
            timed_out = http.post("/v1/completions", json=body)
            assert timed_out.status_code == 504 and timed_out.json()["error"]["type"] == "timeout_error"
            streamed = http.post("/v1/completions", json={**body, "stream": True})
            assert streamed.status_code == 504  # no token before the deadline: the status says so
            release.set()
            for _ in range(100):  # the running generation ends at its next token; the queued one never starts
                if outcomes:
                    break
                threading.Event().wait(0.05)
            assert outcomes == ["GenerationCancelled"]
            assert http.post("/v1/completions", json=body).status_code == 200  # the slot came back


def test_tokenizer_mismatch_is_502_naming_both_fingerprints(
    tiny_bundle_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """A verifier whose tokenizer differs (the reference target's) refuses: 502, never a local answer."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    reference = Path(__file__).resolve().parents[2] / "models" / "reference" / "target"
    if not (reference / "config.json").exists():
        pytest.skip("reference pair not built")
    with (
        serve_in_thread(CloudConfig(model_dir=reference, port=0)) as server,
        EdgeRuntime(EdgeConfig(cloud=server.address, bundle=tiny_bundle_dir("llama"), threads=1)) as runtime,
        start_api_in_thread(runtime) as handle,
        httpx.Client(base_url=handle.base_url, timeout=60) as http,
    ):
        edge = runtime.bundle.manifest.tokenizer_fingerprint
        cloud = runtime.client.ensure_connected().tokenizer_fingerprint if runtime.client else ""
        assert edge != cloud
        for stream in (False, True):
            refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": stream})
            assert refused.status_code == 502
            message = refused.json()["error"]["message"]
            assert edge in message and cloud in message
        verifier = http.get("/health").json()["verifier"]
        assert verifier == {
            "reachable": True, "tokenizer_match": False, "edge_fingerprint": edge, "cloud_fingerprint": cloud,
            "model": verifier["model"],
        }  # fmt: skip
        local = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "mode": "local"})
        assert local.status_code == 200  # a local request does not need the verifier
