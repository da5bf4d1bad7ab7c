"""Chat prompts: the model's own chat template, rendered on the edge as transformers renders it.

``tandem export`` copies the drafter's chat template into the bundle (``chat_template.jinja``).
:class:`ChatTemplate` renders it the way ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`` does in transformers: jinja2's immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception``/``strftime_now`` globals, a
``tojson`` that does not escape HTML, the ``{% generation %}`` tag, and the tokenizer's
special tokens (``bos_token``, ``eos_token``, ...) as variables. The rendered text is then
encoded without adding special tokens (the template wrote them), as transformers does.

A bundle without a template falls back to :func:`plain_chat_prompt` ("role: content" lines
and a final "assistant:"), encoded like a plain prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

Message = Mapping[str, Any]  # {"role": ..., "content": ...} (and optional "name")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``) or failed to render it."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant tokens with it; rendered as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"the bundle's chat template does not compile: {error}") from error
        self.special_tokens = dict(special_tokens)

    @classmethod
    def from_file(cls, path: Path, special_tokens: Mapping[str, str]) -> ChatTemplate:
        return cls(path.read_text(encoding="utf-8"), special_tokens)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's own template writes it."""
        try:
            return self._template.render(
                **self.special_tokens,
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except (jinja2.exceptions.TemplateError, TypeError) as error:
            raise ChatTemplateError(f"the model's chat template refused the conversation: {error}") from error


def plain_chat_prompt(messages: Sequence[Message]) -> str:
    """The fallback for models without a chat template: "role: content" lines, then "assistant:"."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
