"""Generate the picoord.v1 Python modules from the .proto files.

Generated code is a build product, never edited or committed. Two toolchains are
accepted, because the agent must run on Debian 12's own python3-grpcio 1.51 /
python3-protobuf 3.21 as well as on current PyPI releases, and generated code only
imports on a runtime at least as new as the protoc that wrote it:

- ``grpc_tools``: the protoc bundled with PyPI's grpcio-tools (developer machines);
- ``system``: Debian's ``protoc`` (protobuf-compiler) with ``grpc_python_plugin``
  (protobuf-compiler-grpc), which is what a Debian package build uses.

``auto`` picks grpc_tools when its protoc is new enough (Debian's python3-grpc-tools
bundles protoc 3.5, which is not), else the system one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = Path("picoord") / "v1"
MINIMUM_PROTOC = (3, 20)  # first release with --pyi_out and the builder-based gencode
TOOLCHAIN_ENV = "PICOORD_PROTOC_TOOLCHAIN"


def _protoc_version(argv: list[str]) -> tuple[int, ...] | None:
    try:
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+)\.(\d+)", done.stdout)
    return tuple(int(part) for part in match.groups()) if match else None


def _grpc_tools_command() -> list[str] | None:
    argv = [sys.executable, "-m", "grpc_tools.protoc"]
    version = _protoc_version(argv)
    return argv if version and version >= MINIMUM_PROTOC else None


def _system_command() -> list[str] | None:
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    if not protoc or not plugin:
        return None
    version = _protoc_version([protoc])
    if not version or version < MINIMUM_PROTOC:
        return None
    return [protoc, f"--plugin=protoc-gen-grpc_python={plugin}"]


def protoc_command(toolchain: str = "auto") -> list[str]:
    """Return the protoc argv prefix for the chosen toolchain, or raise SystemExit."""
    finders = {"grpc_tools": [_grpc_tools_command], "system": [_system_command]}
    finders["auto"] = finders["grpc_tools"] + finders["system"]
    if toolchain not in finders:
        raise SystemExit(f"unknown protoc toolchain {toolchain!r}: use auto, grpc_tools or system")
    for find in finders[toolchain]:
        command = find()
        if command:
            return command
    raise SystemExit(
        f"no protoc >= {'.'.join(map(str, MINIMUM_PROTOC))} with a gRPC Python plugin found "
        "(install grpcio-tools from PyPI, or Debian's protobuf-compiler and protobuf-compiler-grpc)"
    )


def generate(out_root: Path, toolchain: str | None = None) -> list[Path]:
    """Write picoord/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py below ``out_root``."""
    toolchain = toolchain or os.environ.get(TOOLCHAIN_ENV, "auto")
    sources = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "__init__.py").touch(exist_ok=True)
    command = [
        *protoc_command(toolchain),
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(source) for source in sources),
    ]
    subprocess.run(command, check=True, timeout=120)
    return sorted(out_dir.glob("*_pb2*.py"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: in place)")
    parser.add_argument("--toolchain", choices=["auto", "grpc_tools", "system"], default=None)
    args = parser.parse_args()
    for path in generate(args.out, args.toolchain):
        print(path)


if __name__ == "__main__":
    main()
