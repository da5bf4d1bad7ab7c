"""Regenerate the gRPC stubs from ``tandem.proto``: ``python -m tandemspec.protos.generate``.

Uses the pinned ``grpcio-tools`` (<1.82 in pyproject.toml: stubs from newer tools do not load on
protobuf 6, which Flower requires).
The proto is compiled under the virtual path ``tandemspec/protos`` so the generated
``_pb2_grpc`` module imports its sibling as ``tandemspec.protos.tandem_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "tandem.proto"
GENERATED = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto and write the generated files into ``out_dir``."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Itandemspec/protos={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"tandemspec/protos/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + PROTO_NAME)
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.move(str(Path(tmp) / "tandemspec" / "protos" / name), target)
            written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="folder for the generated files")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
