"""The installed distribution must carry every package of the tree: an editable install
hides a missing entry, a real install (a .deb, the Debian tree) would ship without it."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_package_of_the_tree_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    in_tree = set()
    for package, directory in mapping.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / directory)
            in_tree.add(".".join([package, *relative.parts]))
    assert in_tree == listed
