"""The bundled model pairs, installed with the package as ``tandemspec.models`` (data only).

``reference/`` is the pair trained here from the standard library (``target/``,
``drafter/``, ``edge/``): it ships inside the wheel, so ``tandem demo`` and every default
path work after a plain ``pip install .``, offline.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent


def reference_dir() -> Path:
    """The bundled reference pair (``target/``, ``drafter/``, ``edge/``)."""
    return MODELS_DIR / "reference"
