"""Held-out benchmark prompts: code prefixes from stdlib files the reference pair never saw.

The reference pair trains on the stdlib without ``email/`` (its validation split) and
without test folders; prompts come from ``email/``. They are generated once and shipped as
``prompts.jsonl`` so every machine benchmarks the same text:
``python -m tandemspec.bench.prompts`` rewrites the file.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.jsonl"
HELD_OUT_PACKAGE = "email"


def make_prompts(num_prompts: int = 32, seed: int = 0, max_lines: int = 14, max_chars: int = 600) -> list[str]:
    """The held-out bench prompts: ``def`` prefixes from ``email/``, seeded."""
    root = Path(sysconfig.get_paths()["stdlib"]) / HELD_OUT_PACKAGE
    return def_prefixes(sorted(root.rglob("*.py")), num_prompts, seed, max_lines, max_chars)


def def_prefixes(
    paths: Sequence[Path], num_prompts: int, seed: int = 0, max_lines: int = 14, max_chars: int = 600
) -> list[str]:
    """Up to ``max_lines`` lines of source ending right after a ``def`` line's signature, seeded."""
    rng = random.Random(seed)
    candidates: list[str] = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            continue
        for index, line in enumerate(lines):
            # End each prompt just after a function header: the model must write the body.
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and index >= max_lines:
                prefix = "".join(lines[index - max_lines + 1 : index + 1])
                if len(prefix) <= max_chars:
                    candidates.append(prefix)
    rng.shuffle(candidates)
    return candidates[:num_prompts]


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """Prompts from a JSONL file with one ``{"prompt": ...}`` per line."""
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'prompt'")
            prompts.append(record["prompt"])
    return prompts


def main() -> None:
    with PROMPTS_FILE.open("w", encoding="utf-8") as out:
        for prompt in make_prompts():
            out.write(json.dumps({"prompt": prompt}) + "\n")
    print(PROMPTS_FILE)


if __name__ == "__main__":
    main()
