"""The arm64 lab Pis' netfilter layer: the host's nft and iptables, placed so the arm64
root's own links (/lib -> usr/lib) stay visible (lab/arm64.py)."""

from __future__ import annotations

import os

from picoord.lab.arm64 import layer_path, ldd_paths

LDD = """\tlinux-vdso.so.1 (0x00007ffc5d7f2000)
\tlibnftables.so.1 => /lib/x86_64-linux-gnu/libnftables.so.1 (0x00007f0e1c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1be00000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f0e1c200000)
"""


def test_ldd_paths_are_the_libraries_and_the_loader_once_each() -> None:
    assert ldd_paths(LDD + LDD) == [
        "/lib/x86_64-linux-gnu/libnftables.so.1",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]


def test_a_library_keeps_its_soname_under_its_directorys_real_path() -> None:
    placed = layer_path("/lib/x86_64-linux-gnu/libc.so.6")
    assert placed == os.path.realpath("/lib/x86_64-linux-gnu").lstrip("/") + "/libc.so.6"
    assert not placed.startswith("lib/") or not os.path.islink("/lib")  # never a real lib/ over a link
