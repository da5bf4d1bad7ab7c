"""The reference corpus: Python source of the interpreter's standard library.

Splits (docs/architecture.md "Models"): ``email/`` is the held-out validation split, anything under a
test directory is kept out entirely, and the rest is the training split. The order of
training files is a deterministic shuffle, so two runs on the same interpreter see the
same data.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

VALIDATION_PACKAGE = "email"
# Directory names whose contents never enter training or validation.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusSplit:
    """Paths of the training and validation files, in a fixed order."""

    root: Path
    train: tuple[Path, ...]
    validation: tuple[Path, ...]


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_corpus(root: Path | None = None, seed: int = 0) -> CorpusSplit:
    """List the stdlib ``.py`` files and split them into train and validation."""
    root = root or stdlib_root()
    train: list[Path] = []
    validation: list[Path] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in EXCLUDED_DIRS for part in parts[:-1]):
            continue
        if parts[0] == VALIDATION_PACKAGE:
            validation.append(path)
        else:
            train.append(path)
    if not train or not validation:
        raise FileNotFoundError(f"no stdlib sources found under {root}")
    random.Random(seed).shuffle(train)
    return CorpusSplit(root=root, train=tuple(train), validation=tuple(validation))


def read_texts(paths: tuple[Path, ...]) -> list[str]:
    """Read source files as UTF-8, skipping the few that are not valid UTF-8."""
    texts: list[str] = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts
