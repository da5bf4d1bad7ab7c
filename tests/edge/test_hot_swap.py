"""Bundle hot-swap on a real edge API: a verifier over gRPC, ONNX Runtime drafters, uvicorn, published versions.

Versions are published with ``tandem fed run``'s own code (:func:`publish_version`: hashes,
``versions/vNNNN``, the ``current`` link moved last) from tiny exported drafters of the
tests' llama target; the edge serves ``--bundle OUT/current``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandemspec.edge.api import ApiHandle, start_api_in_thread
from tandemspec.edge.bundle import DRAFTER_NAME, MANIFEST_NAME, TOKENIZER_NAME, BundleManifest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime, LoadedBundle
from tandemspec.edge.watch import Refusal
from tandemspec.federated.fed.publish import CURRENT_NAME, VERSIONS_DIR, publish_version, rollback
from tandemspec.fingerprint import tokenizer_fingerprint

PROMPT = "def add(a, b):\n    return"
BODY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}


class Publisher:
    """Publishes copies of bundle folders under one ``--out`` folder, optionally edited first."""

    def __init__(self, out: Path, work: Path) -> None:
        self.out = out
        self.work = work
        self.num = 0

    def publish(self, bundle: Path, edit: Callable[[Path], None] | None = None) -> str:
        self.num += 1
        staged = self.work / f"build-{self.num}" / "bundle"  # publish_version removes the build folder
        shutil.copytree(bundle, staged)
        if edit is not None:
            edit(staged)
        return publish_version(self.out, staged, self.num, {}, {}).version


@pytest.fixture
def drafters(tiny_bundle_dir: Callable[..., Path]) -> tuple[Path, Path]:
    """Two different drafters for the llama target (same tokenizer)."""
    return tiny_bundle_dir("llama"), tiny_bundle_dir("llama", seed=2)


@pytest.fixture
def published(tmp_path: Path, drafters: tuple[Path, Path]) -> tuple[Publisher, str]:
    publisher = Publisher(tmp_path / "out", tmp_path / "work")
    return publisher, publisher.publish(drafters[0])


@pytest.fixture
def watch_interval_s() -> float:
    """0: the tests call ``watcher.check()`` themselves (a test parametrizes it to poll)."""
    return 0.0


@pytest.fixture
def edge(
    published: tuple[Publisher, str], verifier_for: Callable[[str], Any], watch_interval_s: float
) -> Iterator[tuple[ApiHandle, EdgeRuntime]]:
    """An edge API serving ``OUT/current`` with two generation slots."""
    publisher, _ = published
    config = EdgeConfig(
        cloud=verifier_for("llama").address, bundle=publisher.out / CURRENT_NAME, threads=1, max_concurrent=2
    )
    with EdgeRuntime(config) as runtime, start_api_in_thread(runtime, watch_interval_s=watch_interval_s) as handle:
        yield handle, runtime


def _metric(text: str, name: str) -> float:
    """The value of one sample line ``name value`` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _completion(http: httpx.Client) -> tuple[int, str, str]:
    response = http.post("/v1/completions", json=BODY)
    if response.status_code != 200:
        return response.status_code, "", ""
    data = response.json()
    return 200, data["tandem_stats"]["bundle_version"], data["choices"][0]["text"]


@pytest.mark.parametrize("watch_interval_s", [0.05])
def test_requests_flow_while_a_new_version_is_published(
    edge: tuple[ApiHandle, EdgeRuntime], published: tuple[Publisher, str], drafters: tuple[Path, Path]
) -> None:
    """Two clients send requests back to back while v0002 is published: none fails, old before, new after."""
    handle, _ = edge
    publisher, first = published
    stop = threading.Event()
    records: list[tuple[float, float, int, str, str]] = []  # (sent, answered, status, version, text)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=handle.base_url, timeout=60) as http:
            for _ in range(200):  # bounded, whatever happens
                if stop.is_set():
                    return
                sent = time.monotonic()
                status, version, text = _completion(http)
                with lock:
                    records.append((sent, time.monotonic(), status, version, text))

    def answered_since(t: float) -> int:
        with lock:
            return sum(1 for sent, *_ in records if sent > t)

    def wait_for(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: answered_since(0.0) >= 4, "answers before the publication")
        published_at = time.monotonic()
        second = publisher.publish(drafters[1])
        with httpx.Client(base_url=handle.base_url, timeout=30) as http:
            wait_for(lambda: http.get("/health").json()["bundle_version"] == second, "the swap")
            swapped_at = time.monotonic()
            wait_for(lambda: answered_since(swapped_at) >= 4, "answers after the swap")
            stop.set()
            for thread in threads:
                thread.join(60)
            health = http.get("/health").json()
            models = http.get("/v1/models").json()
            metrics = http.get("/metrics").text
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert [r for r in records if r[2] != 200] == []  # 0 failed requests
    before = [r for r in records if r[0] < published_at]
    after = [r for r in records if r[0] > swapped_at]
    assert before and {r[3] for r in before} == {first}
    assert after and {r[3] for r in after} == {second}
    # Once a request got the new version, every request sent later did too.
    first_new = min(r[0] for r in records if r[3] == second)
    assert all(r[3] == second for r in records if r[0] > first_new)
    # Lossless greedy decoding: both drafters give the target's text.
    assert len({r[4] for r in records}) == 1
    assert health["bundle_version"] == second and health["bundle_refused"] is None and health["bundle_swaps"] == 1
    assert Path(health["bundle"]) == (publisher.out / VERSIONS_DIR / second).resolve()
    assert models["data"][0]["bundle_version"] == second
    assert _metric(metrics, "tandem_edge_bundle_swaps_total") == 1
    assert f'version="{second}"' in metrics


def test_a_request_in_flight_finishes_on_the_version_it_started_with(
    tiny_bundle_dir: Callable[..., Path], verifier_for: Callable[[str], Any], tmp_path: Path,
    drafters: tuple[Path, Path],
) -> None:  # fmt: skip
    """One slot: a held generation on v0001, a swap to v0002 while it runs; it answers v0001, the next v0002."""
    publisher = Publisher(tmp_path / "out", tmp_path / "work")
    first = publisher.publish(drafters[0])
    config = EdgeConfig(cloud=verifier_for("llama").address, bundle=publisher.out / CURRENT_NAME, threads=1,
                        max_concurrent=1)  # fmt: skip
    with EdgeRuntime(config) as runtime:
        real, started, release = runtime.decoder, threading.Event(), threading.Event()

        class Held:
            """The real first decoder, held at its first token until the test lets it go."""

            def generate(self, request: Any, on_tokens: Any = None) -> Any:
                def held(ids: list[int], text: str) -> None:
                    started.set()
                    release.wait(30)
                    on_tokens(ids, text)

                return real.generate(request, held)

        runtime.decoder = Held()  # type: ignore[assignment]
        with start_api_in_thread(runtime) as handle, httpx.Client(base_url=handle.base_url, timeout=60) as http:
            answers: list[tuple[int, str, str]] = []
            in_flight = threading.Thread(target=lambda: answers.append(_completion(http)))
            in_flight.start()
            assert started.wait(30)
            second = publisher.publish(drafters[1])
            assert isinstance(handle.api.watcher.check(), LoadedBundle)
            assert http.get("/health").json()["bundle_version"] == second
            release.set()
            in_flight.join(60)
            after = _completion(http)
    assert answers[0][:2] == (200, first)
    assert after[:2] == (200, second) and after[2] == answers[0][2]


def _corrupt_drafter(publisher: Publisher, version: str) -> None:
    """Flip bytes of a published drafter after publication (disk corruption, a tampered copy)."""
    path = publisher.out / VERSIONS_DIR / version / DRAFTER_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_tokenizer(bundle: Path) -> None:
    """Make the bundle's tokenizer lowercase its input: another tokenizer, so another fingerprint."""
    path = bundle / TOKENIZER_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Lowercase"}
    path.write_text(json.dumps(data), encoding="utf-8")
    manifest = BundleManifest.from_json((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest_data = json.loads(manifest.to_json())
    manifest_data["tokenizer_fingerprint"] = tokenizer_fingerprint(path)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest_data), encoding="utf-8")


def _not_a_graph(bundle: Path) -> None:
    (bundle / DRAFTER_NAME).write_bytes(b"not an ONNX graph")


def test_bad_bundles_are_refused_while_the_old_one_keeps_serving(
    edge: tuple[ApiHandle, EdgeRuntime], published: tuple[Publisher, str], drafters: tuple[Path, Path]
) -> None:
    """A hash mismatch, another tokenizer and a drafter ONNX Runtime cannot load: each refused, v0001 serves on."""
    handle, _ = edge
    publisher, first = published
    watcher = handle.api.watcher
    with httpx.Client(base_url=handle.base_url, timeout=60) as http:
        _, _, expected_text = _completion(http)
        cases: list[tuple[str, Callable[[], str], str]] = [
            ("bundle", lambda: _published_then(publisher, drafters[1], _corrupt_drafter), "sha256"),
            ("tokenizer", lambda: publisher.publish(drafters[1], _other_tokenizer), "not the verifier's"),
            ("smoke_test", lambda: publisher.publish(drafters[1], _not_a_graph), "smoke test failed"),
        ]
        for reason, publish, words in cases:
            version = publish()
            refusal = watcher.check()
            assert isinstance(refusal, Refusal), reason
            assert (refusal.reason, refusal.version) == (reason, version) and words in refusal.message
            assert watcher.check() is None  # not re-checked while the location names it
            health = http.get("/health").json()
            assert health["bundle_version"] == first and health["status"] == "ok"
            assert health["bundle_refused"]["reason"] == reason and health["bundle_refused"]["version"] == version
            assert _completion(http) == (200, first, expected_text)
        metrics = http.get("/metrics").text
        for reason, *_ in cases:
            assert _metric(metrics, f'tandem_edge_bundle_refusals_total{{reason="{reason}"}}') == 1
        assert _metric(metrics, "tandem_edge_bundle_swaps_total") == 0

        rollback(publisher.out, first)  # back to what is served: nothing to load, the refusal is over
        assert watcher.check() is None and http.get("/health").json()["bundle_refused"] is None


def _published_then(publisher: Publisher, bundle: Path, damage: Callable[[Publisher, str], None]) -> str:
    version = publisher.publish(bundle)
    damage(publisher, version)
    return version


def test_rollback_swaps_a_watching_edge_back(
    edge: tuple[ApiHandle, EdgeRuntime], published: tuple[Publisher, str], drafters: tuple[Path, Path]
) -> None:
    """v0001 -> v0002 published -> ``tandem fed rollback --to v0001``: the edge serves v0001 again."""
    from tandemspec.cli import main

    handle, _ = edge
    publisher, first = published
    second = publisher.publish(drafters[1])
    with httpx.Client(base_url=handle.base_url, timeout=60) as http:
        assert isinstance(handle.api.watcher.check(), LoadedBundle)
        assert _completion(http)[:2] == (200, second)
        assert main(["fed", "rollback", "--out", str(publisher.out), "--to", first]) == 0
        assert isinstance(handle.api.watcher.check(), LoadedBundle)
        assert _completion(http)[:2] == (200, first)
        assert http.get("/health").json()["bundle_swaps"] == 2


def test_a_version_is_not_swapped_in_while_the_verifier_cannot_check_its_tokenizer(
    published: tuple[Publisher, str], drafters: tuple[Path, Path]
) -> None:
    """Verifier down: the candidate is ``unverified`` (reported once, tried at every poll); local-only edges swap."""
    import socket

    publisher, first = published
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    config = EdgeConfig(cloud=dead, bundle=publisher.out / CURRENT_NAME, threads=1, max_concurrent=1,
                        connect_timeout_s=0.3)  # fmt: skip
    with EdgeRuntime(config) as runtime, start_api_in_thread(runtime) as handle:
        second = publisher.publish(drafters[1])
        refusal = handle.api.watcher.check()
        assert isinstance(refusal, Refusal) and (refusal.reason, refusal.version) == ("unverified", second)
        assert handle.api.watcher.check() is refusal  # tried again, reported once
        with httpx.Client(base_url=handle.base_url, timeout=60) as http:
            assert http.get("/health").json()["bundle_version"] == first
            metrics = http.get("/metrics").text
        assert _metric(metrics, 'tandem_edge_bundle_refusals_total{reason="unverified"}') == 1
    local = EdgeConfig(bundle=publisher.out / CURRENT_NAME, threads=1, max_concurrent=1, mode="local")
    with EdgeRuntime(local) as runtime, start_api_in_thread(runtime) as handle:
        assert runtime.loaded.version == second  # started on what current names now
        rollback(publisher.out, first)
        loaded = handle.api.watcher.check()
        assert isinstance(loaded, LoadedBundle) and loaded.version == first  # no verifier: no tokenizer check
