"""The ufw backend: a whole policy as ufw's own rule files, loaded in one step.

State is ufw's own: the rule tuples in /etc/ufw/user.rules and user6.rules (what `ufw
status` and `ufw show added` are computed from; `### tuple ### allow tcp 6443 0.0.0.0/0
any 0.0.0.0/0 in`), DEFAULT_INPUT_POLICY in /etc/default/ufw, ENABLED in
/etc/ufw/ufw.conf, and whether ufw's chains are loaded in this network namespace
(`iptables -n -L ufw-user-input`). These are parsed into plain data; `ufw status
verbose` is for people and only says what ufw.conf says, not what is loaded.

Why files and not `ufw allow`/`ufw delete` one by one: each of those commands is a
separate change (a half-applied policy when one fails), and ufw cannot replace its rule
list in one command. Instead the planner renders the complete rule section of both files
exactly as ufw writes it (tested against ufw's own output in the lab), keeps every other
part of the files as ufw wrote them (logging, rate limiting), and:

- when ufw is active and only rules change: `iptables-restore -n /etc/ufw/user.rules`
  and `ip6tables-restore -n /etc/ufw/user6.rules`, which is how ufw itself reloads its user
  chains. Declaring a chain in a --noflush restore flushes it, and with iptables-nft
  (Debian 12's default) each restore is one nf_tables transaction: the IPv4 rule set is
  replaced atomically (then the IPv6 one), and a restore that fails changes nothing;
- when the default policy changes, or ufw is not active yet: `ufw reload` or `ufw --force
  enable`, ufw's own way to rebuild everything from the files. That is several iptables
  calls; for the milliseconds in between ufw's stop leaves INPUT at ACCEPT, so it fails
  open, never closed, and cannot cut the coordinator.

The coordinator's replies need no user rule: ufw's before.rules accept established and
related traffic ahead of every user rule (checked before a change, `accepts_established`);
only the agent's connections out to the coordinator get one.

Files are written next to their target and renamed into place (`mv`, atomic), except
/etc/default/ufw, which is copied over (`cp`, as ufw itself does) so that it may be a
bind-mounted single file. Any failure half-way is undone by the guard, which puts the
snapshot (the same four files and the loaded/not loaded state) back through the same
planner.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.agent.actions.firewall import guard
from picoord.common.checks.firewall import PolicySpec, Rule
from picoord.common.files import write_atomically
from picoord.v1 import actions_pb2

USER_RULES = "/etc/ufw/user.rules"
USER6_RULES = "/etc/ufw/user6.rules"
DEFAULTS = "/etc/default/ufw"
CONF = "/etc/ufw/ufw.conf"
FILES = (USER_RULES, USER6_RULES, DEFAULTS, CONF)
STAGE_DIR = "/etc/ufw"  # root-only, ufw's own, private to each lab Pi
COPIED = (DEFAULTS,)  # written in place rather than renamed over
RULES_MARK = "### RULES ###\n"
END_MARK = "### END RULES ###\n"
READ_TIMEOUT = 15.0
CHANGE_TIMEOUT = 60.0
_TUPLE = re.compile(r"^### tuple ###\s*(.*?)\s*$")
_ASSIGNMENT = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)=(.*)$")
POLICY_WORD = {"allow": "ACCEPT", "deny": "DROP"}
BEFORE_RULES = {4: "/etc/ufw/before.rules", 6: "/etc/ufw/before6.rules"}


@dataclass(frozen=True)
class UfwState:
    """ufw's state as plain data: its four files (None: missing) and whether its chains
    are loaded in this network namespace."""

    files: Mapping[str, str | None] = field(default_factory=dict)
    live: bool = False

    @property
    def defaults(self) -> dict[str, str]:
        return parse_assignments(self.files.get(DEFAULTS) or "")

    @property
    def enabled(self) -> bool:
        return parse_assignments(self.files.get(CONF) or "").get("ENABLED", "no").lower() == "yes"

    @property
    def ipv6(self) -> bool:
        return self.defaults.get("IPV6", "yes").lower() == "yes"

    @property
    def active(self) -> bool:
        return self.live and self.enabled


@dataclass(frozen=True)
class Step:
    """One recorded command; when `content` is set, the executor first writes it to the
    staging file the command then moves or copies into place."""

    argv: tuple[str, ...]
    content: str | None = None
    stage: str | None = None


# ---------------------------------------------------------------- parsing (pure)


def parse_assignments(text: str) -> dict[str, str]:
    """KEY=value lines of a shell-style config file (quotes stripped), as ufw reads them."""
    values = {}
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            values[match.group(1)] = match.group(2).strip().strip("\"'")
    return values


def set_assignment(text: str, key: str, value: str) -> str:
    """`text` with KEY="value" set, replacing the first assignment of KEY or appending one."""
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        match = _ASSIGNMENT.match(line)
        if match and match.group(1) == key:
            lines[index] = f'{key}="{value}"\n'
            return "".join(lines)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + f'{key}="{value}"\n'


def _normal_address(text: str) -> str:
    try:
        return _bare(str(ipaddress.ip_network(text, strict=False)))
    except ValueError:
        return text


def parse_tuples(text: str) -> list[tuple[str, str]]:
    """The rules in a ufw user rules file: (tuple, comment) in file order, addresses
    normalised, the hex comment decoded."""
    rules = []
    for line in text.splitlines():
        match = _TUPLE.match(line)
        if not match:
            continue
        body, _, hexed = match.group(1).partition(" comment=")
        words = body.split()
        if len(words) == 7:
            words[3], words[5] = _normal_address(words[3]), _normal_address(words[5])
        try:
            note = bytes.fromhex(hexed.strip()).decode() if hexed else ""
        except ValueError:
            note = hexed
        rules.append((" ".join(words), note))
    return rules


# ---------------------------------------------------------------- rendering (pure)


def _bare(network: str) -> str:
    """ufw writes a single host without its /32 or /128."""
    net = ipaddress.ip_network(network)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _anywhere(family: int) -> str:
    return "0.0.0.0/0" if family == 4 else "::/0"


def applies_to(rule: Rule, family: int) -> bool:
    return rule.family in (None, family)


def rule_tuple(rule: Rule, family: int) -> str:
    """ufw's `### tuple ###` text: action proto dport dst sport src direction."""
    return " ".join(
        (
            rule.verdict,
            rule.protocol,
            rule.ports or "any",
            _bare(rule.destination) if rule.destination else _anywhere(family),
            str(rule.source_port) if rule.source_port else "any",
            _bare(rule.source) if rule.source else _anywhere(family),
            rule.direction,
        )
    )


def rule_lines(rule: Rule, family: int) -> list[str]:
    """The iptables lines ufw writes under a tuple (ufw.common.UFWRule.format_rule, with
    ufw's expansion of protocol "any" with a port into a tcp and a udp line)."""
    chain = f"{'ufw' if family == 4 else 'ufw6'}-user-{'input' if rule.direction == 'in' else 'output'}"
    ranged = rule.port_to != rule.port_from
    words = []
    if ranged:
        words += ["-m", "multiport", "--dports", rule.ports]
    if rule.destination and rule.destination != _anywhere(family):
        words += ["-d", _bare(rule.destination)]
    if rule.port_from and not ranged:
        words += ["--dport", rule.ports]
    if rule.source and rule.source != _anywhere(family):
        words += ["-s", _bare(rule.source)]
    if rule.source_port:
        words += ["--sport", str(rule.source_port)]
    words += ["-j", "ACCEPT" if rule.verdict == "allow" else "DROP"]
    tail = " ".join(words)
    if rule.protocol != "any":
        return [f"-A {chain} -p {rule.protocol} {tail}"]
    if rule.port_from or rule.source_port:
        return [f"-A {chain} -p tcp {tail}", f"-A {chain} -p udp {tail}"]
    return [f"-A {chain} {tail}"]


def wanted_tuples(rules: Sequence[Rule], family: int) -> list[tuple[str, str]]:
    return [(rule_tuple(rule, family), rule.comment) for rule in rules if applies_to(rule, family)]


def render_rules_section(rules: Sequence[Rule], family: int) -> str:
    """The text between `### RULES ###` and `### END RULES ###` (inclusive of the end mark)."""
    parts = []
    for rule in rules:
        if not applies_to(rule, family):
            continue
        head = f"\n### tuple ### {rule_tuple(rule, family)}"
        if rule.comment:
            head += f" comment={rule.comment.encode().hex()}"
        parts.append(head + "\n" + "".join(line + "\n" for line in rule_lines(rule, family)))
    return "".join(parts) + "\n" + END_MARK


def replace_rules_section(text: str, section: str, path: str) -> str:
    """`text` with its rule section replaced; the header, logging and rate-limit parts stay
    as ufw wrote them. A file as installed has no END mark yet: the rules go right after
    the RULES mark. Refuses a file without the RULES mark: not one ufw wrote."""
    start = text.find(RULES_MARK)
    if start < 0:
        raise ActionFailed(
            f"{path} has no '{RULES_MARK.strip()}' line; not rewriting a file ufw did not write"
        )
    head = text[: start + len(RULES_MARK)]
    end = text.find(END_MARK, len(head))
    rest = text[end + len(END_MARK) :] if end >= 0 else text[len(head) :]
    return head + section + rest


# ---------------------------------------------------------------- planning (pure)


def desired_state(current: UfwState, default_incoming: str, rules: Sequence[Rule]) -> UfwState:
    """ufw's state once the policy holds. A file is only re-rendered when its rules differ,
    so a policy already in place yields the current files byte for byte."""
    for path in FILES[:3]:
        if current.files.get(path) is None:
            raise ActionFailed(f"{path} is missing: is ufw installed on this node?")
    files = dict(current.files)
    for path, family in ((USER_RULES, 4), (USER6_RULES, 6)):
        text = current.files[path] or ""
        if parse_tuples(text) != wanted_tuples(rules, family):
            files[path] = replace_rules_section(text, render_rules_section(rules, family), path)
    word = POLICY_WORD[default_incoming]
    if current.defaults.get("DEFAULT_INPUT_POLICY") != word:
        files[DEFAULTS] = set_assignment(current.files[DEFAULTS] or "", "DEFAULT_INPUT_POLICY", word)
    return UfwState(files, live=True)


def user_rules(keep_open: Sequence[Rule]) -> list[Rule]:
    """The keep-open rules ufw takes as user rules. Its user rules cannot say "established
    only"; ufw's before.rules accept established and related traffic ahead of them (checked
    by `accepts_established`), so the coordinator's replies need no rule of their own."""
    return [rule for rule in keep_open if not rule.established]


def accepts_established(before_rules: str, family: int) -> bool:
    """Whether ufw's before(6).rules accept established/related input, as shipped."""
    chain = "ufw-before-input" if family == 4 else "ufw6-before-input"
    wanted = f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    return any(line.strip() == wanted for line in before_rules.splitlines())


def stage_path(path: str) -> str:
    return os.path.join(STAGE_DIR, f".picoord-{path.strip('/').replace('/', '-')}.new")


def write_step(path: str, content: str) -> Step:
    stage = stage_path(path)
    verb = ("cp", "--") if path in COPIED else ("mv", "-f", "--")
    return Step((*verb, stage, path), content, stage)


def plan_transition(current: UfwState, target: UfwState) -> list[Step]:
    """The steps that take ufw from `current` to `target`: file writes, then one way to
    load them (see the module docstring). Empty when nothing differs. Used both to apply
    a policy and to restore a snapshot; ufw.conf (only ever changed by a restore) goes
    last, so that a restored "loaded but ENABLED=no" state is exactly the old one."""
    changed = {
        path: content
        for path, content in target.files.items()
        if content is not None and current.files.get(path) != content
    }
    writes = [write_step(path, content) for path, content in changed.items() if path != CONF]
    conf = [write_step(CONF, changed[CONF])] if CONF in changed else []
    enable, reload = Step(("ufw", "--force", "enable")), Step(("ufw", "reload"))
    if current.live and not target.live:
        return [Step(("ufw", "--force", "disable")), *writes, *conf]
    steps = list(writes)
    if target.live and not current.live:
        steps.append(enable)
    elif target.live and not current.enabled:
        # Loaded, but ufw.conf says disabled (it would not come back on boot); `ufw enable`
        # alone would find the chains there and load nothing.
        steps += [enable, reload]
    elif target.live and DEFAULTS in changed:
        steps.append(reload)
    elif target.live:
        if USER_RULES in changed:
            steps.append(Step(("iptables-restore", "-n", USER_RULES)))
        if USER6_RULES in changed and target.ipv6:
            steps.append(Step(("ip6tables-restore", "-n", USER6_RULES)))
    return steps + conf


def describe(state: UfwState) -> str:
    rules4, rules6 = (parse_tuples(state.files.get(path) or "") for path in (USER_RULES, USER6_RULES))
    status = "active" if state.active else ("enabled but not loaded" if state.enabled else "inactive")
    policy = state.defaults.get("DEFAULT_INPUT_POLICY", "?")
    ipv6 = "" if state.ipv6 else ", IPv6 off (IPV6=no)"
    return f"ufw {status}, default incoming {policy}, {len(rules4)} IPv4 and {len(rules6)} IPv6 rules{ipv6}"


# ---------------------------------------------------------------- the imperative shell


def read_state(context: ActionContext) -> UfwState:
    files: dict[str, str | None] = {}
    for path in FILES:
        try:
            files[path] = Path(path).read_text()
        except FileNotFoundError:
            files[path] = None
        except OSError as error:
            raise ActionFailed(f"cannot read {path}: {error}") from None
    probe = context.read(["iptables", "-n", "-L", "ufw-user-input"], READ_TIMEOUT)
    if probe.exit_code not in (0, 1) or probe.timed_out:
        raise ActionFailed(
            f"iptables -n -L ufw-user-input failed: {(probe.stderr or probe.stdout).strip()[-300:]}"
        )
    return UfwState(files, live=probe.exit_code == 0)


def run_steps(context: ActionContext, steps: Sequence[Step]) -> None:
    for step in steps:
        if step.content is not None and step.stage is not None and not context.dry_run:
            # root-only like ufw's own files, and durable before the move
            write_atomically(Path(step.stage), step.content.encode(), 0o640)
        context.change(list(step.argv), CHANGE_TIMEOUT)
        if step.stage is not None and not context.dry_run and os.path.exists(step.stage):
            os.unlink(step.stage)  # cp leaves it behind


def restore_snapshot(context: ActionContext, snapshot: Mapping[str, Any]) -> None:
    """Put back what `read_state` saw: {"files": {path: text or None}, "live": bool}, through
    the same planner as a policy (only ufw's four files are ever written)."""
    files, live = snapshot.get("files"), snapshot.get("live")
    if not isinstance(files, dict) or set(files) != set(FILES) or not isinstance(live, bool):
        raise ActionFailed("the ufw snapshot does not name exactly ufw's four files and their state")
    if not all(text is None or isinstance(text, str) for text in files.values()):
        raise ActionFailed("the ufw snapshot holds something other than file texts")
    run_steps(context, plan_transition(read_state(context), UfwState(files, live)))


def apply(
    spec: PolicySpec, keep_open: Sequence[Rule], endpoints: Sequence[guard.Endpoint], context: ActionContext
) -> Outcome:
    """Make ufw hold exactly `keep_open` + the policy's rules and its default, guarded."""
    rules = [*user_rules(keep_open), *spec.rules]
    current = read_state(context)
    for family, path in BEFORE_RULES.items():
        if (family == 4 or current.ipv6) and not accepts_established(read_file(Path(path)) or "", family):
            raise ActionFailed(
                f"{path} does not accept established connections (as ufw ships it), so the "
                "coordinator's replies would meet the policy; restore the file, nothing was changed"
            )
    target = desired_state(current, spec.default_incoming, rules)
    steps = plan_transition(current, target)
    in_place = describe(current)
    what = f"ufw policy (default {spec.default_incoming} incoming, {len(spec.rules)} rules)"
    if not steps:
        return Outcome.done(context, f"the {what} is already in place", in_place)
    if context.dry_run:
        run_steps(context, steps)
        outcome = Outcome.done(context, f"would apply the {what}, keeping the coordinator open", in_place)
        outcome.facts.extend(
            actions_pb2.Fact(key=f"file {step.argv[-1]}", value=step.content)
            for step in steps
            if step.content is not None
        )
        return outcome

    snapshot = {"files": dict(current.files), "live": current.live}
    outcome = guard.confirm_or_revert(
        context,
        apply=lambda ctx: run_steps(ctx, steps),
        restore=lambda ctx: restore_snapshot(ctx, snapshot),
        endpoints=endpoints,
        window=spec.confirm_within,
        what=what,
        backend="ufw",
        snapshot=snapshot,
    )
    outcome.in_place = in_place
    return outcome
