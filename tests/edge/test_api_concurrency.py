"""The local API serves requests concurrently, each generation with a drafter cache of its own, and
bounds the queue: past it 429, while shutting down 503, both with ``Retry-After``.

The decoders are the real ones (forks of the runtime's drafter) behind a thin recorder that
notes when each generation starts and ends, or holds it until the test lets it go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tandemspec.edge.api import start_api_in_thread
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime

PROMPTS = ("def add(a, b):\n    return", "for i in range(", "class Point:\n    def")


class Recorder:
    """Wraps a runtime's decoders: records (start, end) of each generation; optionally waits at the start."""

    def __init__(self, runtime: EdgeRuntime, barrier: threading.Barrier | None = None) -> None:
        self.intervals: list[tuple[float, float]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.hold = False
        self._barrier = barrier
        self._lock = threading.Lock()
        new_decoder = runtime.new_decoder
        runtime.decoder = self.wrap(runtime.decoder)  # type: ignore[assignment]
        runtime.new_decoder = lambda: self.wrap(new_decoder())  # type: ignore[method-assign, assignment, return-value]

    def wrap(self, decoder: Any) -> Any:
        recorder = self

        class Recorded:
            def generate(self, request: Any, on_tokens: Any = None) -> Any:
                start = time.monotonic()
                recorder.entered.release()
                if recorder._barrier is not None:
                    recorder._barrier.wait()  # raises BrokenBarrierError unless all parties run at once
                if recorder.hold:
                    recorder.release.wait(30)
                try:
                    return decoder.generate(request, on_tokens)
                finally:
                    with recorder._lock:
                        recorder.intervals.append((start, time.monotonic()))

        return Recorded()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def test_three_requests_run_at_once_and_each_equals_its_request_alone(
    tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]
) -> None:
    config = EdgeConfig(cloud=verifier_for("llama").address, bundle=tiny_bundle_dir("llama"), threads=1)
    with EdgeRuntime(config) as runtime:
        recorder = Recorder(runtime, threading.Barrier(3, timeout=30))
        with start_api_in_thread(runtime) as handle, httpx.Client(base_url=handle.base_url, timeout=60) as http:

            def ask(prompt: str) -> dict[str, Any]:
                body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
                reply: dict[str, Any] = http.post("/v1/completions", json=body).json()
                return reply

            with ThreadPoolExecutor(3) as pool:
                together = list(pool.map(ask, PROMPTS))
            assert _max_overlap(recorder.intervals) == 3  # all three were generating at the same time
            recorder._barrier = None
            alone = [ask(prompt) for prompt in PROMPTS]  # one at a time: same tokens (no shared drafter state)
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
    assert all(r["tandem_stats"]["mode_used"] == "lossless" for r in together)


def test_past_the_queue_429_and_while_closing_503(
    tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any]
) -> None:
    config = EdgeConfig(
        cloud=verifier_for("llama").address, bundle=tiny_bundle_dir("llama"), threads=1, max_concurrent=1, max_queued=1
    )
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with EdgeRuntime(config) as runtime:
        recorder = Recorder(runtime)
        recorder.hold = True
        with start_api_in_thread(runtime) as handle, httpx.Client(base_url=handle.base_url, timeout=60) as http:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(http.post, "/v1/completions", json=body)
                assert recorder.entered.acquire(timeout=30)  # the first one holds the only slot
                queued = pool.submit(http.post, "/v1/completions", json=body)
                for _ in range(600):  # until the second one is admitted and waiting
                    if "tandem_edge_generations_waiting 1.0" in http.get("/metrics").text:
                        break
                    time.sleep(0.01)
                full = http.post("/v1/completions", json=body)
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["type"] == "rate_limit_error"
                recorder.release.set()
                assert running.result().status_code == 200 and queued.result().status_code == 200
            assert http.post("/v1/completions", json=body).status_code == 200  # room again
            handle.api.close()
            closing = http.post("/v1/completions", json=body)
            assert closing.status_code == 503 and closing.headers["retry-after"] == "1"
