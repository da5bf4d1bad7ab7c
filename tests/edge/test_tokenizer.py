"""Edge tokenizer and the streaming text tracker (deltas, stop strings)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.tokenizer import EdgeTokenizer, TextTracker


def _tokenizer(tiny_bundle_dir: Callable[..., Path]) -> EdgeTokenizer:
    return EdgeTokenizer.from_bundle(load_bundle(tiny_bundle_dir("llama")))


def test_prompt_gets_bos(tiny_bundle_dir: Callable[..., Path]) -> None:
    tokenizer = _tokenizer(tiny_bundle_dir)
    ids = tokenizer.encode_prompt("def f(x):\n    return x")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.decode(ids) == "def f(x):\n    return x"


def test_deltas_rebuild_the_text_and_stop_strings_cut_it(tiny_bundle_dir: Callable[..., Path]) -> None:
    tokenizer = _tokenizer(tiny_bundle_dir)
    text = "for i in range(10):\n    print(i)  # café ünïcode\nreturn"
    ids = tokenizer.encode_prompt(text)[1:]
    tracker = TextTracker(tokenizer)
    deltas = []
    for token in ids:
        assert not tracker.push(token)
        deltas.append(tracker.take_delta())
        assert "\ufffd" not in deltas[-1]
    deltas.append(tracker.take_delta(final=True))
    assert "".join(deltas) == text

    tracker = TextTracker(tokenizer, stop_strings=["print("])
    streamed = []
    stopped_at = None
    for n, token in enumerate(ids):
        if tracker.push(token):
            stopped_at = n
            break
        streamed.append(tracker.take_delta())
    assert stopped_at is not None
    streamed.append(tracker.take_delta(final=True))
    assert tracker.final_text() == "".join(streamed) == text[: text.index("print(")]
