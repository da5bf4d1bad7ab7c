"""Offline training text for distillation: documentation prose, docstrings and chat prompts.

Sources (all present on a Debian machine with ``apt-get install python3-doc``):

- *docs*: the interpreter's HTML documentation (``/usr/share/doc/python3.*/html``) as text,
  split into passages;
- *docstrings*: module, class and function docstrings of the standard library sources
  (the reference corpus's files, same split);
- *chat prompts*: instructions built from templates over stdlib names and over general
  topics, rendered with the target's own chat template; the target's answers to them and
  the drafter's own samples are scored by the target during training.

Held-out text is kept apart by document: a doc page or passage whose path hashes into the
lowest :data:`HELD_OUT_PERCENT` percent, docstrings of ``email/`` (the reference held-out
package) and the held-out topic list never enter training.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import html.parser
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandemspec.federated.reference.corpus import VALIDATION_PACKAGE, split_corpus, stdlib_root

HELD_OUT_PERCENT = 8
DOC_GLOB = "/usr/share/doc/python3.*/html"
_PASSAGE_CHARS = 1200
_SKIPPED_TAGS = frozenset({"script", "style", "head", "nav"})

TRAIN_TOPICS = (
    "the water cycle",
    "photosynthesis",
    "black holes",
    "the French Revolution",
    "volcanoes",
    "machine learning",
    "healthy sleep",
    "saving money",
    "learning a new language",
    "climate change",
    "the human heart",
    "gravity",
    "the Roman Empire",
    "electric cars",
    "recycling",
    "the internet",
    "vaccines",
    "the moon landing",
    "honeybees",
    "time management",
    "public speaking",
    "the solar system",
    "DNA",
    "earthquakes",
    "renewable energy",
    "chess",
    "the printing press",
    "coffee",
    "rainforests",
    "the stock market",
    "friendship",
    "cooking pasta",
    "running",
    "meditation",
    "the Great Wall of China",
    "penguins",
    "democracy",
    "inflation",
    "cloud computing",
    "music theory",
    "the immune system",
    "dinosaurs",
    "ocean tides",
    "writing a resume",
    "job interviews",
    "gardening",
    "bicycles",
    "the Renaissance",
    "quantum computers",
    "the periodic table",
    "habits",
    "teamwork",
    "electricity",
    "deserts",
)
HELD_OUT_TOPICS = (
    "the Industrial Revolution",
    "coral reefs",
    "the Pythagorean theorem",
    "jazz",
    "the Amazon river",
    "sourdough bread",
    "solar panels",
    "the Olympic Games",
    "octopuses",
    "budget travel",
    "glaciers",
    "robots",
)
TOPIC_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "What is {topic}?",
    "Give me three interesting facts about {topic}.",
    "Write a short paragraph about {topic}.",
    "Why is {topic} important?",
    "Write a short poem about {topic}.",
    "Summarize the history of {topic} in a few sentences.",
    "What are the pros and cons of {topic}?",
)
CODE_TEMPLATES = (
    "What does `{name}` do in Python?",
    "Show a short example of how to use `{name}` in Python.",
    "Explain the Python `{module}` module.",
    "When should I use `{name}`?",
)
PASSAGE_TEMPLATES = (
    "Summarize the following text in two sentences:\n\n{passage}",
    "Explain this documentation to a beginner:\n\n{passage}",
)
FIXED_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "How do I read a file line by line in Python?",
    "Write a haiku about autumn.",
    "What is the difference between a list and a tuple in Python?",
    "Translate 'Good morning, how are you?' into French.",
    "Give me a recipe for a simple salad.",
    "What is 12 times 13?",
)


def _held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


class _TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML page, one block per paragraph-like element."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip += 1
        elif tag in {"p", "div", "pre", "li", "h1", "h2", "h3", "dt", "dd", "tr"}:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    """Readable text of one documentation page (whitespace collapsed per line, blank runs merged)."""
    extractor = _TextExtractor()
    extractor.feed(page)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in "".join(extractor.parts).splitlines()]
    text = "\n".join(line for line in lines if line and line != "¶")
    return re.sub(r"\n{3,}", "\n\n", text.replace("¶", ""))


def passages(text: str, size: int = _PASSAGE_CHARS) -> list[str]:
    """Split text at line breaks into passages of about ``size`` characters."""
    out, current = [], ""
    for line in text.splitlines():
        if len(current) + len(line) > size and current:
            out.append(current.strip())
            current = ""
        current += line + "\n"
    if current.strip():
        out.append(current.strip())
    return out


@dataclass(frozen=True)
class TextSplit:
    """Training and held-out documents of one source."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


def doc_pages(doc_root: Path | None = None) -> TextSplit:
    """The HTML documentation as text, split by page path (empty when python3-doc is absent)."""
    roots = [doc_root] if doc_root else [Path(p) for p in sorted(glob.glob(DOC_GLOB))[:1]]
    train: list[str] = []
    held: list[str] = []
    for root in roots:
        for path in sorted(root.rglob("*.html")):
            relative = str(path.relative_to(root))
            if relative.startswith(("genindex", "py-modindex", "search", "_static")):
                continue
            text = html_text(path.read_text(encoding="utf-8", errors="replace"))
            if len(text) < 200:
                continue
            (held if _held_out(relative) else train).append(text)
    return TextSplit(tuple(train), tuple(held))


def docstrings(root: Path | None = None) -> tuple[TextSplit, list[str], list[str]]:
    """Stdlib docstrings (``email/`` held out) and the public names they document (train, held-out)."""
    split = split_corpus(root or stdlib_root())
    out: dict[bool, list[str]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    for held, paths in ((False, split.train), (True, split.validation)):
        for path in paths:
            module = ".".join(path.relative_to(split.root).with_suffix("").parts).removesuffix(".__init__")
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 80:
                    continue
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                out[held].append(f"{name}\n\n{doc}")
                if not name.split(".")[-1].startswith("_"):
                    names[held].append(name)
    return TextSplit(tuple(out[False]), tuple(out[True])), names[False], names[True]


def chat_prompts(names: Sequence[str], topics: Sequence[str], snippets: Sequence[str], seed: int) -> list[str]:
    """Instructions from the templates, in a seeded order."""
    prompts = [t.format(topic=topic) for topic in topics for t in TOPIC_TEMPLATES]
    for name in names:
        module = name.split(".")[0]
        prompts += [t.format(name=name, module=module) for t in CODE_TEMPLATES]
    prompts += [t.format(passage=s[:600]) for s in snippets for t in PASSAGE_TEMPLATES]
    prompts = sorted(set(prompts))
    random.Random(seed).shuffle(prompts)
    return prompts


@dataclass(frozen=True)
class DistillText:
    """Everything the distillation reads, already split."""

    corpus_train: tuple[str, ...]
    corpus_held_out: tuple[str, ...]
    prompts_train: tuple[str, ...]
    prompts_held_out: tuple[str, ...]


def build_text(seed: int, corpus_files: Sequence[Path] = (), doc_root: Path | None = None) -> DistillText:
    """Docs + docstrings + any extra corpus files; chat prompts from them (held-out apart)."""
    docs = doc_pages(doc_root)
    strings, names_train, names_held = docstrings()
    extra = [path.read_text(encoding="utf-8", errors="replace") for path in corpus_files]
    extra_split = TextSplit(
        tuple(t for p, t in zip(corpus_files, extra, strict=True) if not _held_out(str(p))),
        tuple(t for p, t in zip(corpus_files, extra, strict=True) if _held_out(str(p))),
    )
    train = [p for doc in (*docs.train, *extra_split.train) for p in passages(doc)] + list(strings.train)
    held = [p for doc in (*docs.held_out, *extra_split.held_out) for p in passages(doc)] + list(strings.held_out)
    rng = random.Random(seed)
    rng.shuffle(train)
    snippets_train = [p for p in train if len(p) > 300][:2000]
    snippets_held = [p for p in held if len(p) > 300][:60]
    prompts_train = chat_prompts(names_train[:4000], TRAIN_TOPICS, snippets_train, seed)
    prompts_held = list(FIXED_PROMPTS) + chat_prompts(names_held[:40], HELD_OUT_TOPICS, snippets_held, seed + 1)
    held_set = set(prompts_held)
    prompts_train = [p for p in prompts_train if p not in held_set]
    return DistillText(tuple(train), tuple(held), tuple(prompts_train), tuple(prompts_held))


def draft_vocabulary(
    primary: Iterable[Sequence[int]],
    secondary: Iterable[Sequence[int]],
    size: int,
    vocab_size: int,
    always: Sequence[int],
) -> list[int]:
    """``size`` ids, sorted: ``always``, then by frequency in ``primary``, then in ``secondary`` (ties by id)."""
    first: Counter[int] = Counter()
    for row in primary:
        first.update(row)
    second: Counter[int] = Counter()
    for row in secondary:
        second.update(row)
    chosen = {int(i) for i in always if 0 <= i < vocab_size}
    ranked = sorted(set(first) | set(second), key=lambda t: (-first[t], -second[t], t))
    for token in ranked:
        if len(chosen) >= size:
            break
        if 0 <= token < vocab_size:
            chosen.add(int(token))
    for token in range(vocab_size):  # a tiny corpus may not fill the head: pad with low ids
        if len(chosen) >= size:
            break
        chosen.add(token)
    return sorted(chosen)


__all__ = ["VALIDATION_PACKAGE", "DistillText", "build_text", "draft_vocabulary"]
