"""The distribution: one wheel holding every subpackage and the generated stubs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("tandemspec", "protos", "edge", "cloud", "federated", "models")


def declared_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_source_package_is_declared() -> None:
    """A new subfolder with an ``__init__.py`` must be listed in pyproject, or wheels lose it."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folder_to_package = {folder: package for package, folder in package_dir.items()}
    found = set()
    for top in SOURCE_DIRS:
        for init in (ROOT / top).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT).as_posix()
            top_folder = folder.split("/")[0]
            rest = folder[len(top_folder) :].strip("/").replace("/", ".")
            found.add(folder_to_package[top_folder] + ("." + rest if rest else ""))
    assert found == set(declared_packages())


def test_wheel_contains_subpackages_and_stubs(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in SOURCE_DIRS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("tandemspec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for stub in ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py", "tandem.proto"):
        assert f"tandemspec/protos/{stub}" in names, stub
    assert not any(name.split("/")[0] in {"edge", "cloud", "protos", "federated", "models"} for name in names)
    # The reference pair ships inside the wheel: default paths work after a non-editable install.
    for part in ("target/model.safetensors", "target/tokenizer.json", "edge/drafter.onnx", "edge/manifest.json"):
        assert f"tandemspec/models/reference/{part}" in names, part
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tandem = tandemspec.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
