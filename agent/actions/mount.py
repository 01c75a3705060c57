"""Mount executors: mount a glusterfs, nfs, bind or tmpfs file system, optionally persisted,
and unmount it again.

State comes from /proc/self/mountinfo (parsed into plain data by `parse_mountinfo`), the
persistence from /etc/fstab and /etc/systemd/system; the decisions are pure functions
(`plan_mount`, `plan_fstab`, `plan_unit`, `mount_unit_name`, ...) tested with tables.

Rules the executors keep, and why:
- Paths: targets and bind sources follow common/validation.py `mount_path_refusal`
  (never /, /proc, /sys, /dev, nor over a system tree; nothing under /etc, /usr, /run,
  /var/lib/picoord, the agent's own state dir, ... unless agent.toml's allow_mount_paths
  names it), checked after resolving symlinks, and for every symlink on the way (a target
  /mnt/x -> /etc is /etc). No check-then-use race: a bind or tmpfs mount is made on an
  O_PATH descriptor opened on the checked path one component at a time without following
  symlinks (`pin_directory`), named /proc/PID/fd/N with mount --no-canonicalize.
- A mount is found by its target (the topmost mount on that path, after resolving
  symlinks).
  Mounted with the same source and type: UNCHANGED. Mounted with anything else: FAILED,
  naming what is there; picoord never unmounts a mount it was not asked to unmount.
- Options: only the kernel's per-mount flags (ro/rw, nosuid, nodev, noexec, atime flags)
  are visible in mountinfo; file-system options (tmpfs size=, glusterfs
  backup-volfile-servers=) are not reliably, so they are not compared. A flag that
  differs is brought in line by a remount for bind and tmpfs mounts (which is how
  `mount --bind` + `remount,bind,ro` converges even after a half-done first run); for
  glusterfs and nfs it is reported in the message and left alone (unmount and apply again
  to change it), since remounting a network mount is not reliably supported.
- Persistence is declarative and limited to picoord's own entries: FSTAB means exactly one
  /etc/fstab line for the target ending in "# picoord"; SYSTEMD means a unit
  /etc/systemd/system/<escaped target>.mount whose first line is "# picoord ..."; NONE
  means neither. Lines and units picoord did not write are never edited: one for the same
  target makes the action FAILED before anything runs.
- Files are rewritten atomically (temp file in the same directory, fsync, rename, original
  mode and owner kept). When the file is itself a mount point (a bind-mounted /etc/fstab,
  as in containers and lab sandboxes) a rename cannot replace it, so it is rewritten in
  place instead. Writing or removing a file is recorded like a command, e.g.
  argv ["write", "/etc/fstab"], so a dry run lists it.
- systemd: `systemctl daemon-reload` (and `enable`/`disable` of a unit) only when systemd
  runs (/run/systemd/system exists); otherwise the message says the file is written and
  takes effect at boot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.common.checks.storage import VFS_FLAGS, MountSpec, mount_spec, unmount_target
from picoord.common.mountinfo import MountEntry, escape, parse_mountinfo, unescape
from picoord.common.validation import FieldError, bind_source, mount_target
from picoord.v1 import actions_pb2

MOUNTINFO = Path("/proc/self/mountinfo")
FSTAB = Path("/etc/fstab")
UNIT_DIR = Path("/etc/systemd/system")
SYSTEMD_RUNNING = Path("/run/systemd/system")  # sd_booted(): systemd is PID 1
FSTAB_MARKER = "# picoord"
UNIT_MARKER = "# picoord: written by the picoord agent, which edits or removes only files carrying this line"
MOUNT_TIMEOUT = 120.0  # a glusterfs mount waits for its volfile server
COMMAND_TIMEOUT = 30.0

FSTYPES_MOUNTED = {  # what mountinfo calls each kind
    "glusterfs": ("fuse.glusterfs", "glusterfs"),
    "nfs": ("nfs", "nfs4"),
    "tmpfs": ("tmpfs",),
}
NETWORK_KINDS = ("glusterfs", "nfs")


# --- mountinfo -----------------------------------------------------------------------------


def mounts_at(entries: Sequence[MountEntry], path: str) -> list[MountEntry]:
    """The mounts on exactly `path`, in mount order (the last one is the visible one)."""
    return [entry for entry in entries if entry.mount_point == path]


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def containing_mount(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The visible mount holding `path`: the longest mount point above it, mounted last."""
    best: MountEntry | None = None
    for entry in entries:
        if _under(path, entry.mount_point) and (
            best is None or len(entry.mount_point) >= len(best.mount_point)
        ):
            best = entry
    return best


def bind_origin(entries: Sequence[MountEntry], source: str) -> tuple[str, str] | None:
    """(device, root) a bind mount of `source` shows in mountinfo."""
    holder = containing_mount(entries, source)
    if holder is None:
        return None
    relative = posixpath.relpath(source, holder.mount_point)
    root = holder.root if relative == "." else posixpath.join(holder.root, relative)
    return holder.device, posixpath.normpath(root)


def describe(entry: MountEntry) -> str:
    source = entry.source if entry.root == "/" else f"{entry.source}[{entry.root}]"
    return f"{entry.fstype} {source} on {entry.mount_point} ({','.join(entry.options)})"


# --- decisions (pure) ------------------------------------------------------------------------


class MountConflict(ValueError):
    """Something else is mounted (or persisted by someone else) where the request wants its mount."""


def flag_differences(wanted: Sequence[str], options: Sequence[str]) -> list[str]:
    """Per-mount flags asked for (ro/rw always: no "ro" means rw) that the mount does not have."""
    have = set(options)
    flags = [option for option in wanted if option in VFS_FLAGS]
    if "ro" not in flags and "rw" not in flags:
        flags.append("rw")
    missing = []
    for flag in flags:
        if flag in ("ro", "rw", "nosuid", "nodev", "noexec", "noatime", "relatime", "nodiratime"):
            ok = flag in have
        elif flag in ("suid", "dev", "exec", "diratime"):
            ok = f"no{flag}" not in have
        elif flag == "atime":
            ok = "noatime" not in have
        else:  # strictatime, norelatime
            ok = "noatime" not in have and "relatime" not in have
        if not ok:
            missing.append(flag)
    return missing


def same_mount(spec: MountSpec, entry: MountEntry, origin: tuple[str, str] | None) -> bool:
    if spec.kind == "bind":
        return origin is not None and (entry.device, posixpath.normpath(entry.root)) == origin
    if entry.fstype not in FSTYPES_MOUNTED[spec.kind]:
        return False
    if spec.kind == "tmpfs":
        return True  # a tmpfs has no source worth the name
    return entry.source.rstrip("/") == spec.source.rstrip("/")


def mount_commands(spec: MountSpec) -> list[list[str]]:
    """The argv lists that mount `spec` on its (existing) target."""
    options = ",".join(spec.options)
    if spec.kind == "bind":
        commands = [["mount", "--bind", spec.source, spec.target]]
        if spec.options:
            commands.append(["mount", "-o", f"remount,bind,{options}", spec.target])
        return commands
    with_options = ["-o", options] if options else []
    return [["mount", "-t", spec.kind, *with_options, spec.source, spec.target]]


@dataclass
class MountPlan:
    commands: list[list[str]] = field(default_factory=list)
    in_place: str = ""
    notes: list[str] = field(default_factory=list)


def plan_mount(
    spec: MountSpec,
    entries: Sequence[MountEntry],
    target_exists: bool,
    origin: tuple[str, str] | None = None,
) -> MountPlan:
    """What to run to have `spec` mounted, given the mount table.

    `origin` is bind_origin() of the bind source (None for other kinds)."""
    plan = MountPlan()
    present = mounts_at(entries, spec.target)
    if present:
        top = present[-1]
        if not same_mount(spec, top, origin):
            raise MountConflict(
                f"{spec.target} already has {describe(top)} mounted, not the requested {spec.kind} "
                f"{spec.source}; picoord never unmounts what it was not asked to: unmount it first"
            )
        plan.in_place = f"mounted: {describe(top)}"
        differing = flag_differences(spec.options, top.options)
        if differing:
            if spec.kind in NETWORK_KINDS:
                plan.notes.append(
                    f"mounted without {','.join(differing)} (mounted {','.join(top.options)}); "
                    "unmount and apply again to change a network mount's options"
                )
            else:
                flags = list(spec.options) or ["rw"]
                remount = ["remount", "bind", *flags] if spec.kind == "bind" else ["remount", *flags]
                plan.commands.append(["mount", "-o", ",".join(remount), spec.target])
                plan.notes.append(f"remounting to get {','.join(differing)}")
        return plan
    if not target_exists:
        plan.commands.append(["mkdir", "-p", spec.target])
    plan.commands.extend(mount_commands(spec))
    return plan


def fstab_fields(spec: MountSpec) -> tuple[str, str, str, str]:
    """(source, target, fstype, options) of the fstab line for `spec`."""
    options = list(spec.options)
    if spec.kind in NETWORK_KINDS and "_netdev" not in options:
        options.insert(0, "_netdev")  # wait for the network at boot
    if spec.kind == "bind":
        return spec.source, spec.target, "none", ",".join(["bind", *options])
    return spec.source, spec.target, spec.kind, ",".join(options) or "defaults"


def fstab_line(spec: MountSpec) -> str:
    source, target, fstype, options = fstab_fields(spec)
    return f"{escape(source)} {escape(target)} {fstype} {options} 0 0 {FSTAB_MARKER}"


def _fstab_target(line: str) -> str | None:
    fields = line.split()
    if len(fields) < 2 or line.lstrip().startswith("#"):
        return None
    return posixpath.normpath(unescape(fields[1]))


def is_ours(line: str) -> bool:
    return line.rstrip().endswith(FSTAB_MARKER) and not line.lstrip().startswith("#")


def plan_fstab(text: str, target: str, line: str | None) -> str | None:
    """The new /etc/fstab text with exactly `line` (or, when None, no picoord line) for
    `target`, or None when the file is right already. Raises MountConflict if a line that
    picoord did not write mounts something on `target` and a line is wanted."""
    lines = text.splitlines()
    foreign = [item for item in lines if _fstab_target(item) == target and not is_ours(item)]
    if line is not None and foreign:
        raise MountConflict(
            f"/etc/fstab already has a line for {target} that picoord did not write: {foreign[0].strip()!r}; "
            "remove it, or ask for persist none"
        )
    kept: list[str] = []
    placed = False
    for item in lines:
        if is_ours(item) and _fstab_target(item) == target:
            if line is not None and not placed:
                kept.append(line)
                placed = True
            continue
        kept.append(item)
    if line is not None and not placed:
        kept.append(line)
    if kept == lines:
        return None
    return "\n".join(kept) + ("\n" if kept else "")


_UNIT_VALID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def systemd_escape_path(path: str) -> str:
    """`systemd-escape --path PATH` (unit_name_path_escape in systemd): simplify the path,
    drop the outer slashes, '/' becomes '-', and every byte that is not [A-Za-z0-9:_.]
    (and a leading '.') becomes \\xNN. "/" alone is "-"."""
    simplified = "/".join(part for part in path.split("/") if part)
    if not simplified:
        return "-"
    out = []
    for index, byte in enumerate(simplified.encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (index == 0 and char == ".") or char not in _UNIT_VALID:
            out.append(f"\\x{byte:02x}")
        else:
            out.append(char)
    return "".join(out)


def mount_unit_name(target: str) -> str:
    return systemd_escape_path(target) + ".mount"


def _unit_value(text: str) -> str:
    return text.replace("%", "%%")  # systemd expands %-specifiers in these settings


def mount_unit_text(spec: MountSpec) -> str:
    """A .mount unit equivalent to the fstab line (systemd.mount(5))."""
    _source, _target, fstype, options = fstab_fields(spec)
    network = spec.kind in NETWORK_KINDS
    unit = [
        UNIT_MARKER,
        "[Unit]",
        f"Description=picoord {spec.kind} mount of {_unit_value(spec.source)} on {_unit_value(spec.target)}",
    ]
    if network:
        unit += ["Wants=network-online.target", "After=network-online.target"]
    if spec.kind == "bind":
        unit.append(f"RequiresMountsFor={_unit_value(spec.source)}")
    unit += ["", "[Mount]", f"What={_unit_value(spec.source)}", f"Where={_unit_value(spec.target)}"]
    if spec.kind != "bind":
        unit.append(f"Type={fstype}")
    unit.append(f"Options={_unit_value(options)}")
    unit += ["", "[Install]", f"WantedBy={'remote-fs.target' if network else 'local-fs.target'}", ""]
    return "\n".join(unit)


def is_our_unit(text: str) -> bool:
    return text.startswith(UNIT_MARKER.split(":")[0])


def plan_unit(existing: str | None, wanted: str | None, name: str) -> str | None:
    """ "write", "remove" or None for the unit file; MountConflict if it is someone else's."""
    if existing is not None and not is_our_unit(existing):
        if wanted is None:
            return None
        raise MountConflict(
            f"{UNIT_DIR / name} exists and was not written by picoord; remove it, or ask for persist none"
        )
    if wanted is None:
        return "remove" if existing is not None else None
    return None if existing == wanted else "write"


# --- files ---------------------------------------------------------------------------------


def write_file(path: Path, text: str, in_place: bool = False, mode: int = 0o644) -> None:
    """Replace the file's content atomically, keeping its mode and owner (new files: `mode`)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        status = None
    if in_place:
        with open(path, "r+" if status else "w") as handle:
            handle.seek(0)
            handle.write(text)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        return
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".picoord", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as output:
            output.write(text)
            output.flush()
            os.fsync(output.fileno())
        if status is not None:
            os.chmod(temporary, status.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(temporary, status.st_uid, status.st_gid)
        else:
            os.chmod(temporary, mode)
        try:
            os.replace(temporary, path)
        except OSError as error:
            if error.errno not in (errno.EBUSY, errno.EXDEV):
                raise
            # The file is a mount point of its own (bind-mounted): a rename cannot replace it.
            os.unlink(temporary)
            write_file(path, text, in_place=True)
            return
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself is durable once the directory is
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def record_file_change(
    context: ActionContext, verb: str, path: Path, detail: str, act: Callable[[], None]
) -> None:
    """Record a file change like a command (argv [verb, path]); do it unless in a dry run."""
    record = actions_pb2.CommandRecord(argv=[verb, str(path)], ran=not context.dry_run)
    context.commands.append(record)
    if context.dry_run:
        return
    started = time.monotonic()
    try:
        act()
    except OSError as error:
        record.exit_code = 1
        record.output_tail = str(error)
        raise ActionFailed(f"{verb} {path}: {error}") from None
    record.seconds = round(time.monotonic() - started, 3)
    record.output_tail = detail


def _systemd_runs() -> bool:
    return SYSTEMD_RUNNING.is_dir()


def _is_mount_point(entries: Sequence[MountEntry], path: Path) -> bool:
    return bool(mounts_at(entries, str(path)))


# --- the imperative shell ------------------------------------------------------------------


def read_mounts() -> list[MountEntry]:
    try:
        return parse_mountinfo(MOUNTINFO.read_text(errors="surrogateescape"))
    except OSError as error:
        raise ActionFailed(f"cannot read {MOUNTINFO}: {error}") from None


def resolve_checked(field: str, path: str, context: ActionContext) -> str:
    """`path` with symlinks resolved, refused (FieldError naming the field) when it, or where
    any symlink on the way leads, is a path this node does not mount or bind from
    (common/validation.py mount_path_refusal, with this node's allow_mount_paths and the
    agent's own state dir): /mnt/x -> /etc is /etc."""
    check = mount_target if field == "target" else bind_source
    allowed, own = context.allow_mount_paths, (str(context.state_dir),)
    prefix = ""
    for part in [part for part in path.split("/") if part]:
        prefix = f"{prefix}/{part}"
        if not os.path.islink(prefix):
            continue
        leads_to = os.path.realpath(prefix)
        try:
            check(field, leads_to, node=True, allowed=allowed, extra_trees=own)
        except FieldError as error:
            how = "resolves to" if prefix == path else f"goes through the symlink {prefix} to"
            raise FieldError(field, f"{path!r} {how} {leads_to}: {error.reason}") from None
    resolved = os.path.realpath(path)
    try:
        check(field, resolved, node=True, allowed=allowed, extra_trees=own)
    except FieldError as error:
        if resolved == path:
            raise
        raise FieldError(field, f"{path!r} resolves to {resolved}: {error.reason}") from None
    return resolved


def resolve_target(target: str, context: ActionContext) -> str:
    return resolve_checked("target", target, context)


_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def pin_directory(path: str) -> int:
    """An O_PATH descriptor of the directory `path` (resolved and checked before), opened
    one component at a time following no symlink: a symlink planted since the check makes
    it fail instead of leading elsewhere. Its real path is checked once more."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [part for part in path.split("/") if part]:
            parent, fd = fd, -1
            try:
                fd = os.open(part, _PIN_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as error:
        if fd >= 0:
            os.close(fd)
        raise ActionFailed(
            f"{path} changed after it was checked ({error.strerror}: a symlink or something else "
            "appeared on the way); nothing was mounted"
        ) from None
    if real != path:
        os.close(fd)
        raise ActionFailed(f"{path} now resolves to {real}, not what was checked; nothing was mounted")
    return fd


@contextlib.contextmanager
def pinned_argv(argv: Sequence[str], paths: Sequence[str]) -> Iterator[list[str]]:
    """`argv` with each of `paths` replaced by /proc/PID/fd/N of a pinned descriptor and
    `--no-canonicalize` (mount(8) would otherwise turn it back into a path string): the
    kernel follows the descriptor to the very directory that was checked."""
    fds: list[int] = []
    try:
        names = {}
        for path in paths:
            fds.append(pin_directory(path))
            names[path] = f"/proc/{os.getpid()}/fd/{fds[-1]}"
        yield [argv[0], "--no-canonicalize", *(names.get(word, word) for word in argv[1:])]
    finally:
        for fd in fds:
            os.close(fd)


def run_mount_commands(commands: Sequence[Sequence[str]], spec: MountSpec, context: ActionContext) -> None:
    """Run the plan. A bind or tmpfs mount goes to its target (and a bind to its source)
    through pinned descriptors. glusterfs and nfs go through mount helpers that keep the
    target's name (in their process and for their own unmount), so for them the resolved
    target is only checked once more right before. A remount names a mount already
    checked to be ours in the mount table."""
    for argv in commands:
        if argv[0] != "mount" or context.dry_run or "remount" in ",".join(argv):
            context.change(argv, MOUNT_TIMEOUT if argv[0] == "mount" else COMMAND_TIMEOUT)
            continue
        if spec.kind in NETWORK_KINDS:
            os.close(pin_directory(spec.target))
            context.change(argv, MOUNT_TIMEOUT)
            continue
        paths = [spec.target] + ([spec.source] if spec.kind == "bind" else [])
        with pinned_argv(argv, paths) as run_argv:
            context.change(argv, MOUNT_TIMEOUT, run_argv=run_argv)


@dataclass
class PersistPlan:
    fstab: str | None = None  # new text
    fstab_detail: str = ""
    unit: str | None = None  # write / remove
    unit_text: str | None = None
    notes: list[str] = field(default_factory=list)
    systemctl: list[list[str]] = field(default_factory=list)


def plan_persistence(
    spec_target: str, spec: MountSpec | None, persist: str, context: ActionContext
) -> PersistPlan:
    """Read /etc/fstab and the unit file; decide what to write (spec None: remove ours)."""
    plan = PersistPlan()
    fstab_text = read_file(FSTAB) or ""
    line = fstab_line(spec) if spec is not None and persist == "fstab" else None
    plan.fstab = plan_fstab(fstab_text, spec_target, line)
    if plan.fstab is not None:
        plan.fstab_detail = f"+ {line}" if line else f"- picoord line for {spec_target}"
    if line is None and any(
        _fstab_target(item) == spec_target and not is_ours(item) for item in fstab_text.splitlines()
    ):
        plan.notes.append(f"/etc/fstab has a line for {spec_target} that picoord did not write; left as is")
    name = mount_unit_name(spec_target)
    unit_path = UNIT_DIR / name
    existing = read_file(unit_path)
    wanted = mount_unit_text(spec) if spec is not None and persist == "systemd" else None
    plan.unit = plan_unit(existing, wanted, name)
    plan.unit_text = wanted
    if existing is not None and not is_our_unit(existing) and wanted is None:
        plan.notes.append(f"{unit_path} was not written by picoord; left as is")
    runs = _systemd_runs()
    if runs:
        if plan.unit == "remove":
            plan.systemctl.append(["systemctl", "disable", name])
        if plan.fstab is not None or plan.unit is not None:
            plan.systemctl.append(["systemctl", "daemon-reload"])
        if wanted is not None:
            state = context.read(["systemctl", "is-enabled", name], COMMAND_TIMEOUT)
            if plan.unit == "write" or state.stdout.strip() != "enabled":
                plan.systemctl.append(["systemctl", "enable", name])
    elif plan.unit == "write":
        plan.notes.append(f"systemd is not running here, so unit {name} takes effect at boot")
    elif plan.fstab is not None and line is not None:
        plan.notes.append("the fstab line takes effect at boot")
    return plan


def apply_persistence(plan: PersistPlan, target: str, context: ActionContext) -> None:
    if plan.fstab is not None:
        new_text = plan.fstab
        in_place = _is_mount_point(read_mounts(), FSTAB)
        record_file_change(
            context, "write", FSTAB, plan.fstab_detail, lambda: write_file(FSTAB, new_text, in_place)
        )
    unit_path = UNIT_DIR / mount_unit_name(target)
    systemctl = list(plan.systemctl)
    if plan.unit == "remove":
        for argv in [argv for argv in systemctl if argv[1] == "disable"]:
            context.change(argv, COMMAND_TIMEOUT)
            systemctl.remove(argv)
        record_file_change(context, "remove", unit_path, f"- {unit_path}", unit_path.unlink)
    elif plan.unit == "write" and plan.unit_text is not None:
        text = plan.unit_text
        record_file_change(context, "write", unit_path, f"+ {unit_path}", lambda: write_file(unit_path, text))
    for argv in systemctl:
        context.change(argv, COMMAND_TIMEOUT)


def mount(request: actions_pb2.Mount, context: ActionContext) -> Outcome:
    """Have the file system mounted on the target, persisted as asked."""
    spec = mount_spec(request)
    target = resolve_target(spec.target, context)
    if target != spec.target:
        spec = MountSpec(spec.kind, spec.source, target, spec.options, spec.persist)
    entries = read_mounts()
    origin = None
    if spec.kind == "bind":
        source = resolve_checked("source", spec.source, context)
        if not os.path.isdir(source):
            raise ActionFailed(f"bind source {spec.source} is not an existing directory")
        spec = MountSpec(spec.kind, source, spec.target, spec.options, spec.persist)
        origin = bind_origin(entries, source)
    try:
        plan = plan_mount(spec, entries, os.path.isdir(target), origin)
        persist = plan_persistence(target, spec, spec.persist, context)
    except MountConflict as error:
        raise ActionFailed(str(error)) from None
    run_mount_commands(plan.commands, spec, context)
    apply_persistence(persist, target, context)
    what = f"{spec.kind} {spec.source} on {target}"
    if not context.commands:
        message = f"{what} in place"
    elif context.dry_run:
        message = (
            f"would mount {what}" if any(argv[0] == "mount" for argv in plan.commands) else f"{what} in place"
        )
    else:
        message = (
            f"mounted {what}" if any(argv[0] == "mount" for argv in plan.commands) else f"{what} in place"
        )
    if spec.persist != "none":
        message += f", persisted by {spec.persist}"
    notes = plan.notes + persist.notes
    if notes:
        message += "; " + "; ".join(notes)
    outcome = Outcome.done(context, message, plan.in_place)
    if spec.persist == "systemd":
        outcome.facts.append(actions_pb2.Fact(key="mount.unit", value=mount_unit_name(target)))
    return outcome


def unmount(request: actions_pb2.Unmount, context: ActionContext) -> Outcome:
    """Unmount whatever is mounted on the target; with `forget`, drop picoord's fstab line and unit."""
    target = resolve_target(unmount_target(request), context)
    present = mounts_at(read_mounts(), target)
    persist = plan_persistence(target, None, "none", context) if request.forget else PersistPlan()
    for _entry in reversed(present):  # stacked mounts: one umount each, the top first
        context.change(["umount", target], MOUNT_TIMEOUT)
    apply_persistence(persist, target, context)
    in_place = "; ".join(describe(entry) for entry in present)
    if present:
        message = f"{'would unmount' if context.dry_run else 'unmounted'} {target}"
    else:
        message = f"nothing mounted on {target}"
    if persist.fstab is not None or persist.unit is not None:
        message += f"; {'would forget' if context.dry_run else 'forgot'} its picoord persistence"
    if persist.notes:
        message += "; " + "; ".join(persist.notes)
    return Outcome.done(context, message, in_place)
