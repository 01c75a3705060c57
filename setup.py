"""Build hook: generate picoord.v1 from proto/ before the Python files are collected."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_GENERATOR = Path(__file__).parent / "proto" / "generate.py"
_spec = importlib.util.spec_from_file_location("proto_generate", _GENERATOR)
proto_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto_generate)


class BuildPyWithProto(build_py):
    def run(self) -> None:
        if self.editable_mode:
            proto_generate.generate(proto_generate.PROTO_ROOT)
            super().run()
        else:
            super().run()
            # Generated into the build tree, so building a Debian package with Debian's
            # toolchain never overwrites a developer's in-place modules.
            proto_generate.generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProto})
