"""Text <-> token ids on the edge, with the ``tokenizers`` library (no transformers).

:class:`EdgeTokenizer` encodes a prompt exactly as the model's ``AutoTokenizer`` does (the
bundle's ``tokenizer.json`` carries the post-processor transformers uses, so BOS and other
special tokens appear only where the model's own pipeline puts them) and a conversation
with the model's chat template (:mod:`tandemspec.edge.chat`).

:class:`TextTracker` follows the text of a growing list of generated ids: the delta to
stream after each token (holding back incomplete UTF-8 sequences and stop-string
prefixes) and where a stop string first appears. It decodes incrementally, as vLLM's
detokenizer does: each token decodes a short window of the latest ids and keeps what the
window adds past its stable prefix, so the cost per token is bounded instead of growing
with the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from tandemspec.edge.bundle import Bundle
from tandemspec.edge.chat import ChatTemplate, Message, plain_chat_prompt

_REPLACEMENT = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence
# Unsettled ids (their text still ends in an incomplete character) past which the tracker
# looks for an earlier settled boundary, so that a run of invalid bytes cannot grow the window.
_MAX_UNSETTLED_IDS = 8


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogate, which JSON allows and UTF-8 cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate at character {error.start}") from error
    return text


class EdgeTokenizer:
    """The bundle's ``tokenizer.json``, its special ids and its chat template."""

    def __init__(
        self, path: Path, bos_id: int | None, eos_ids: Sequence[int], chat_template: ChatTemplate | None = None
    ) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_template = chat_template

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> EdgeTokenizer:
        template_path = bundle.chat_template_path
        template = (
            ChatTemplate.from_file(template_path, bundle.manifest.special_tokens) if template_path is not None else None
        )
        return cls(bundle.tokenizer_path, bundle.manifest.bos_id, bundle.manifest.eos_ids, template)

    def encode_prompt(self, text: str) -> tuple[int, ...]:
        """Token ids of a prompt, as the model's ``AutoTokenizer`` encodes it (special tokens included)."""
        return tuple(self._tokenizer.encode(check_text(text, "the prompt"), add_special_tokens=True).ids)

    def encode_chat(self, messages: Sequence[Message]) -> tuple[int, ...]:
        """Token ids of a conversation followed by the assistant's turn.

        With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``
        (rendered, then encoded without adding special tokens). Without one: the plain
        "role: content" rendering, encoded as a prompt.
        """
        if self.chat_template is None:
            return self.encode_prompt(plain_chat_prompt(messages))
        text = check_text(self.chat_template.render(messages, add_generation_prompt=True), "the conversation")
        return tuple(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


class TextTracker:
    """The text of generated ids as they arrive: streaming deltas and stop strings.

    State, after vLLM's incremental detokenizer: ids before ``_read`` have *settled* text
    (it cannot change whatever comes next); ``_prefix_text`` is the text of the window
    ``ids[_prefix:_read]``. A new token decodes ``ids[_prefix:]``; what that adds past
    ``_prefix_text`` is the text of ``ids[_read:]``. When it does not end in an incomplete
    character it settles and the window moves on; otherwise it stays *pending*.
    """

    def __init__(self, tokenizer: EdgeTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._longest_stop = max((len(s) for s in self._stop_strings), default=0)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._settled: list[str] = []  # settled text, in pieces (joined only for the final text)
        self._num_settled = 0  # characters in ``_settled``
        self._pending = ""  # text of ids[_read:]; may end in an incomplete character
        self._streamed = 0  # characters already handed out as deltas
        self.stop_index: int | None = None  # where the first stop string starts in the text

    @property
    def text(self) -> str:
        """The whole text so far (joins every piece: for the end of a generation, not per token)."""
        return "".join(self._settled) + self._pending

    def push(self, token: int) -> bool:
        """Add one token; True when a stop string is now complete."""
        before = self._num_settled + len(self._pending)
        self._ids.append(token)
        window = self._decode(self._prefix, len(self._ids))
        added = window[len(self._prefix_text) :]
        if added and not window.endswith(_REPLACEMENT):
            self._settle(added, len(self._ids))
            self._pending = ""
        elif len(self._ids) - self._read > _MAX_UNSETTLED_IDS:
            self._pending = self._settle_earlier(window)
        else:
            self._pending = added
        return self._find_stop(max(0, before - self._longest_stop))

    def final_text(self) -> str:
        """The text, cut before the stop string if one was found."""
        text = self.text
        return text if self.stop_index is None else text[: self.stop_index]

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet; held back while it may be an incomplete character or a stop prefix."""
        if final:
            end = self._num_settled + len(self._pending)
        else:  # settled text only, less a tail that may begin a stop string
            settled_tail = self._tail(self._num_settled - self._longest_stop, pending=False)
            end = self._num_settled - self._stop_prefix_length(settled_tail)
        if self.stop_index is not None:
            end = min(end, self.stop_index)
        if end <= self._streamed:
            return ""
        delta = self._tail(self._streamed)[: end - self._streamed]
        self._streamed = end
        return delta

    # -- steps ---------------------------------------------------------------------------

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end])

    def _settle(self, added: str, read: int) -> None:
        """``added`` (the text of ids[_read:read]) is final: move the window on."""
        self._settled.append(added)
        self._num_settled += len(added)
        self._prefix, self._read = self._read, read
        self._prefix_text = self._decode(self._prefix, self._read)

    def _settle_earlier(self, window: str) -> str:
        """Settle up to the latest boundary whose text no later id can change; returns the new pending text.

        Only the last character of ``window`` may still change (a UTF-8 decoder's output is
        final up to its last incomplete sequence), so a boundary ``j`` has settled when the
        window of ``ids[:j]`` is a prefix of ``window`` short of its last character.
        """
        base = len(self._prefix_text)
        for j in range(len(self._ids) - 1, self._read, -1):
            candidate = self._decode(self._prefix, j)
            if base < len(candidate) < len(window) and window.startswith(candidate):
                self._settle(candidate[base:], j)
                return window[len(candidate) :]
        if window == self._prefix_text:  # the unsettled ids have no text at all (e.g. skipped special ids)
            self._settle("", len(self._ids))
            return ""
        return window[base:]

    def _tail(self, start: int, pending: bool = True) -> str:
        """The text from character ``start`` on (joins only the pieces it needs)."""
        start = max(0, start)
        pieces: list[str] = [self._pending] if pending else []
        position = self._num_settled
        for piece in reversed(self._settled):
            if position <= start:
                break
            pieces.append(piece)
            position -= len(piece)
        return "".join(reversed(pieces))[start - position :]

    def _find_stop(self, start: int) -> bool:
        if not self._stop_strings:
            return False
        tail = self._tail(start)
        hits = [i for s in self._stop_strings if (i := tail.find(s)) >= 0]
        if hits:
            self.stop_index = start + min(hits)
            return True
        return False

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
