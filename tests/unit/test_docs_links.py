"""The README and docs/ say only what exists: every relative link points at a file (and,
into a Markdown file, at a heading) that is there, every `coordctl SUBCOMMAND` the
README names is a command of coordctl's own parser, and the README's seed table names
every command of the seed document (examples/seed.md)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from picoord.coordinator.ctl.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`]+`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")
# A command ends at a shell or prose separator; `a|b` between words means "a or b".
COMMAND_END = re.compile(r"[;&>#()`\n]|\s\\?\|\s|\s{2,}|$")
OPTIONAL = re.compile(r"\[[^\]]*\]")
GLOBAL_OPTIONS_WITH_VALUE = ("--admin-socket", "--context")


def markdown_files() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Link targets outside code, without external links and in-page anchors."""
    targets = LINK.findall(_without_code(text))
    return [t for t in targets if not t.startswith(EXTERNAL) and not t.startswith("#")]


def anchors_in_page(text: str) -> list[str]:
    """In-page links (`#heading`)."""
    return [t[1:] for t in LINK.findall(_without_code(text)) if t.startswith("#")]


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to
    dashes, a repeated slug numbered -1, -2 ..."""
    slugs: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slug, count = base, 0
        while slug in slugs:
            count += 1
            slug = f"{base}-{count}"
        slugs.add(slug)
    return slugs


def broken_links(page: Path, root: Path = REPO_ROOT) -> list[str]:
    """What is wrong with each relative link of one page (in the tree at root), in words."""
    text = page.read_text()
    problems = [
        f"#{anchor}: no such heading" for anchor in anchors_in_page(text) if anchor not in heading_slugs(text)
    ]
    for target in relative_links(text):
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve()
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_slugs(resolved.read_text()):
            problems.append(f"{target}: no heading #{anchor} there")
    return problems


def coordctl_commands(text: str) -> list[list[str]]:
    """The words after `coordctl` in each command written in code (fenced blocks and inline
    code), global options and their values left out, up to the first separator."""
    fenced = [m.group(0) for m in FENCE.finditer(text)]
    inline = [c.strip("`").replace("\n", " ") for c in INLINE_CODE.findall(FENCE.sub("", text))]
    commands = []
    for snippet in fenced + inline:
        for match in re.finditer(r"(?<![\w.-])coordctl(?![\w-])", snippet):
            rest = snippet[match.end() :]
            line = rest[: COMMAND_END.search(rest).start()] if rest[:1] == " " else ""
            words, skip = [], False
            for word in OPTIONAL.sub(" ", line).split():
                if skip:
                    skip = False
                elif word.startswith(GLOBAL_OPTIONS_WITH_VALUE) and "=" not in word:
                    skip = True
                elif not word.startswith(("-", "[")):
                    words.append(word)
            commands.append(words)
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def _first_positional_choices(parser: argparse.ArgumentParser) -> list[str] | None:
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            return list(action.choices) if action.choices else None
    return None


def unknown_subcommand(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """Why `coordctl WORDS` is not a command of the parser, or None. Alternatives written
    `a|b` are each checked; an upper-case word is a placeholder (`coordctl COMMAND --help`)."""
    if not words or words[0].isupper():
        return None
    top = _subcommands(parser) or {}
    for name in words[0].split("|"):
        if name not in top:
            return f"coordctl {name}: no such command (coordctl has {', '.join(top)})"
        sub = top[name]
        choices = _subcommands(sub)
        choices = list(choices) if choices else _first_positional_choices(sub)
        if choices is None or len(words) < 2 or words[1].isupper():
            continue
        for second in words[1].split("|"):
            if second not in choices:
                return f"coordctl {name} {second}: no such command (coordctl {name} has {', '.join(choices)})"
    return None


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_every_relative_link_points_at_something_that_exists(page: Path) -> None:
    assert broken_links(page) == []


def test_every_coordctl_command_in_the_readme_exists() -> None:
    commands = coordctl_commands((REPO_ROOT / "README.md").read_text())
    assert len(commands) > 20, "the README's coordctl commands were not found: the extractor is broken"
    parser = build_parser()
    assert [why for words in commands if (why := unknown_subcommand(parser, words))] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("`coordctl nodes`", [["nodes"]]),
        (
            "```\ncoordctl top\ncoordctl token create [--ttl 24h] [--uses N]\n```",
            [["top"], ["token", "create"]],
        ),
        ("and `coordctl\nrollout mcp` then `coordctl ps`", [["rollout", "mcp"], ["ps"]]),
        ("`sudo coordctl apply -f x.yaml --dry-run`", [["apply", "x.yaml"]]),
        ("```\ncoordctl --context lab nodes   # another context\n```", [["nodes"]]),
        ("```sh\n.venv/bin/coordctl top ; coordctl rm stack mcp\n```", [["top"], ["rm", "stack", "mcp"]]),
        ("`coordctl` is the CLI; `coordctl COMMAND --help`", [[], ["COMMAND"]]),
        ("`coordctl nodes | grep pi` `coordctl rm service x \\| y`", [["nodes"], ["rm", "service", "x"]]),
        ("prose coordctl nodes outside code", []),
        ("`coordctl node show|label NAME`", [["node", "show|label", "NAME"]]),
    ],
)
def test_coordctl_commands_are_read_from_code_only(text: str, expected: list[list[str]]) -> None:
    assert coordctl_commands(text) == expected


@pytest.mark.parametrize(
    ("words", "refused"),
    [
        (["nodes"], False),
        (["node", "drain", "pi1"], False),
        (["node", "show|label|remove", "pi1"], False),
        (["rm", "stack", "mcp"], False),
        (["rm", "stack|service", "mcp"], False),
        (["rollout", "status", "mcp"], False),
        (["stack", "deploy"], False),
        (["deploy", "mcp"], True),
        (["node", "evict", "pi1"], True),
        (["rm", "volume", "x"], True),
        (["stack", "rm", "mcp"], True),
        (["secret", "create|delete"], True),
        (["COMMAND"], False),
        (["node", "VERB"], False),
    ],
)
def test_unknown_subcommands_are_named(words: list[str], refused: bool) -> None:
    assert (unknown_subcommand(build_parser(), words) is not None) == refused


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("[a](docs/lab.md) [b](https://example.org/x) [c](#top) [d](docs/lab.md#the-lab)\n# Top\n", []),
        ("[a](docs/nowhere.md)", ["docs/nowhere.md: no such file"]),
        (
            "[a](docs/lab.md#no-such-heading)",
            ["docs/lab.md#no-such-heading: no heading #no-such-heading there"],
        ),
        ("`[a](docs/nowhere.md)` and\n```\n[b](nowhere.md)\n```\n", []),  # code, not links
        ("[a](#missing)", ["#missing: no such heading"]),
        ("![a](grafana/missing.png)", ["grafana/missing.png: no such file"]),
    ],
)
def test_broken_links_are_named(tmp_path: Path, text: str, problems: list[str]) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lab.md").write_text("# The lab\n")
    page = tmp_path / "README.md"
    page.write_text(text)
    assert broken_links(page, root=tmp_path) == problems


def test_heading_slugs_follow_github() -> None:
    text = "# Quick start: the lab, on one machine\n## `coordctl apply`\n## Notes\n## Notes\n"
    assert heading_slugs(text) == {"quick-start-the-lab-on-one-machine", "coordctl-apply", "notes", "notes-1"}


SEED_TABLE_HEADING = "## The seed, command by command"


def seed_commands(seed: str) -> list[str]:
    """Each command of the seed's bash blocks: comments dropped, continued lines joined,
    a leading sudo dropped, spaces collapsed."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", seed, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            line = " ".join(line.split())
            if line:
                commands.append(line.removeprefix("sudo "))
    return commands


def seed_table_patterns(readme: str) -> list[re.Pattern[str]]:
    """The commands written in the first column of the README's seed table, as patterns:
    `…` stands for any text, `a; b` is two commands, a leading sudo is optional."""
    section = readme.split(SEED_TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in re.findall(r"^\|(.*?[^\\])\|", section, re.MULTILINE):
        for code in re.findall(r"`([^`]+)`", row):
            for command in code.replace("\\|", "|").split("; "):
                command = " ".join(command.split()).removeprefix("sudo ")
                parts = [re.escape(part.strip()) for part in command.split("…")]
                patterns.append(re.compile(r"\s*.*?\s*".join(parts)))
    return patterns


def uncovered_seed_commands(seed: str, readme: str) -> list[str]:
    patterns = seed_table_patterns(readme)
    return [c for c in seed_commands(seed) if not any(p.fullmatch(c) for p in patterns)]


def test_the_readme_seed_table_names_every_seed_command() -> None:
    seed = (REPO_ROOT / "examples" / "seed.md").read_text()
    assert len(seed_commands(seed)) >= 30, "the seed's commands were not found: the extractor is broken"
    assert uncovered_seed_commands(seed, (REPO_ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize(
    ("seed", "table", "uncovered"),
    [
        ("```bash\n# a comment\nsudo apt update\n```\n", "| `apt update` | x |", []),
        ("```bash\nsudo apt update\n```\n", "| `apt upgrade` | x |", ["apt update"]),
        ("```bash\ndocker tag a:1 reg/a:1  # tag it\n```\n", "| `docker tag … reg/…` | x |", []),
        (
            "```bash\ngluster volume create v \\\n  p1:/b \\\n  force\n```\n",
            "| `gluster volume create v … force` | x |",
            [],
        ),
        ("```bash\nmkdir -p d\ncp a b\n```\n", "| `mkdir -p d; sudo cp …` | x |", []),
        ("```bash\ncurl -sSL x | sh\n```\n", "| `curl -sSL x \\| sh` | x |", []),
        ("```bash\nufw allow 22/tcp\n```\n", "| `22/tcp` | x |", ["ufw allow 22/tcp"]),
        ("```yaml\nkind: Deployment\n```\n", "| nothing | x |", []),
    ],
)
def test_uncovered_seed_commands_are_named(seed: str, table: str, uncovered: list[str]) -> None:
    header = f"{SEED_TABLE_HEADING}\n\n| the seed | picoord |\n|---|---|\n"
    readme = f"{header}{table}\n\n## Next\n| `apt update` | x |\n"  # a later table does not count
    assert uncovered_seed_commands(seed, readme) == uncovered
