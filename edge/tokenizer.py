"""Text <-> token ids on the edge, with the ``tokenizers`` library (no transformers).

Also holds :class:`TextTracker`, which follows the text of a growing list of generated
ids: the delta to stream after each token (holding back incomplete UTF-8 sequences) and
where a stop string first appears.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from tandemspec.edge.bundle import Bundle

_REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class EdgeTokenizer:
    """The bundle's ``tokenizer.json`` plus its special ids."""

    def __init__(self, path: Path, bos_id: int | None, eos_ids: Sequence[int]) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> EdgeTokenizer:
        return cls(bundle.tokenizer_path, bundle.manifest.bos_id, bundle.manifest.eos_ids)

    def encode_prompt(self, text: str) -> tuple[int, ...]:
        """Token ids of a prompt, with the BOS id prepended (when the bundle has one)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ((self.bos_id,) if self.bos_id is not None else ()) + tuple(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


class TextTracker:
    """The text of generated ids as they arrive: streaming deltas and stop strings."""

    def __init__(self, tokenizer: EdgeTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._ids: list[int] = []
        self.text = ""
        self._streamed = 0  # characters of ``text`` already handed out as deltas
        self.stop_index: int | None = None  # where the first stop string starts in ``text``

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string is now complete."""
        self._ids.append(token)
        previous = len(self.text)
        self.text = self._tokenizer.decode(self._ids)
        if self._stop_strings:
            longest = max(len(s) for s in self._stop_strings)
            start = max(0, previous - longest)
            hits = [i for s in self._stop_strings if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.stop_index = min(hits)
                return True
        return False

    def final_text(self) -> str:
        """The text, cut before the stop string if one was found."""
        return self.text if self.stop_index is None else self.text[: self.stop_index]

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet; held back while it may be an incomplete character or a stop prefix."""
        text = self.final_text()
        end = len(text)
        if not final:
            if text.endswith(_REPLACEMENT):
                end = len(text.rstrip(_REPLACEMENT))
            end = min(end, len(text) - self._stop_prefix_length(text))
        if end <= self._streamed:
            return ""
        delta = text[self._streamed : end]
        self._streamed = end
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
