"""Edge tokenizer and the streaming text tracker (deltas, stop strings)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
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


class CountingTokenizer(EdgeTokenizer):
    """Counts the ids every decode call is given (the cost of detokenising)."""

    num_decoded_ids = 0
    max_ids_per_call = 0

    def decode(self, ids: Sequence[int]) -> str:
        self.num_decoded_ids += len(ids)
        self.max_ids_per_call = max(self.max_ids_per_call, len(ids))
        return super().decode(ids)


def _byte_ids(tokenizer: EdgeTokenizer) -> dict[int, int]:
    """byte -> the id of the byte-level BPE token for that single byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})  # GPT-2's bytes_to_unicode
    ids = {b: tokenizer._tokenizer.token_to_id(c) for b, c in chars.items()}
    assert None not in ids.values()
    return ids  # type: ignore[return-value]


def test_incremental_text_equals_full_decoding_at_bounded_cost(tiny_bundle_dir: Callable[..., Path]) -> None:
    """Real text with multi-byte characters, and random byte soup (incomplete and invalid UTF-8):
    after every token the tracker's text is the full decoding of the ids so far, its deltas
    rebuild it without a replacement character where the text has none, and each token decodes
    a bounded window, not every id so far."""
    bundle = load_bundle(tiny_bundle_dir("llama"))
    tokenizer = CountingTokenizer(bundle.tokenizer_path, bundle.manifest.bos_id, bundle.manifest.eos_ids)
    text = "def naïve(x):\n    return '中文字符 😀🎉' * x  # ünïcode café\n" * 40
    sequences = [list(tokenizer.encode_prompt(text)[1:])]
    byte_ids = _byte_ids(tokenizer)
    rng = random.Random(0)
    tricky = [0x80, 0xBF, 0xC3, 0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x98, 0x80, 0x41, 0x20]
    for _ in range(30):
        soup = [byte_ids[rng.choice(tricky)] if rng.random() < 0.6 else rng.randrange(3, 384) for _ in range(150)]
        sequences.append(soup)
    for ids in sequences:
        tokenizer.num_decoded_ids = tokenizer.max_ids_per_call = 0
        tracker = TextTracker(tokenizer)
        deltas = []
        for n, token in enumerate(ids, 1):
            tracker.push(token)
            deltas.append(tracker.take_delta())
            assert tracker.text == EdgeTokenizer.decode(tokenizer, ids[:n])
        deltas.append(tracker.take_delta(final=True))
        assert "".join(deltas) == tracker.final_text() == EdgeTokenizer.decode(tokenizer, ids)
        assert tokenizer.max_ids_per_call <= 24 and tokenizer.num_decoded_ids <= 12 * len(ids)
    assert len(sequences[0]) > 800


def test_stop_strings_across_tokens_and_held_back_prefixes(tiny_bundle_dir: Callable[..., Path]) -> None:
    tokenizer = _tokenizer(tiny_bundle_dir)
    text = "x = 1\ny = 2\n# END of block\nz = 3"
    ids = tokenizer.encode_prompt(text)[1:]
    tracker = TextTracker(tokenizer, stop_strings=["# END", "never"])
    streamed = []
    for token in ids:
        stopped = tracker.push(token)
        streamed.append(tracker.take_delta(final=stopped))
        assert not "".join(streamed).endswith("#")  # a possible stop prefix is held back
        if stopped:
            break
    assert "".join(streamed) == tracker.final_text() == "x = 1\ny = 2\n"
