"""compat/kernels.py: the parts that need no qemu (parsing, merging, the table, the initramfs
archive, skipping where qemu is missing). The boots themselves take minutes: docs/compat.md."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "compat" / "kernels.py"
spec = importlib.util.spec_from_file_location("compat_kernels", PATH)
assert spec is not None and spec.loader is not None
kernels = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = kernels  # dataclasses look their module up
spec.loader.exec_module(kernels)


def cell(scenario: str, backend: str, profile: str, result: str, reason: str = "",
         kernel: str = "x") -> dict[str, str]:
    return {"scenario": scenario, "backend": backend, "profile": profile, "kernel": kernel,
            "result": result, "reason": reason}


def test_parse_json_lines() -> None:
    rows = [cell("first touch", "uffd", "native", "pass"),
            cell("kernel discard", "sigbus:memfd", "native", "n/a", "cannot")]
    text = "".join(json.dumps(row) + "\n" for row in rows) + "\n"
    assert kernels.parse_rows(text) == rows


def test_parse_rejects_what_is_not_a_cell() -> None:
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        kernels.parse_rows(json.dumps(cell("a", "b", "c", "pass")) + "\nTraceback\n")
    with pytest.raises(ValueError, match="not a matrix cell"):
        kernels.parse_rows('{"scenario": "a"}\n')


def test_parse_the_older_document() -> None:
    document = {"kernel": "6.18.0", "machine": "x86_64", "profiles": [
        {"profile": "native", "cells": {"kernel discard": {
            "uffd": {"status": "PASS"},
            "sigbus:memfd": {"status": "SKIP", "reason": "cannot"}}}},
        {"profile": "unprivileged", "unavailable": "needs root"}]}
    assert kernels.parse_rows(json.dumps(document, indent=2)) == [
        cell("kernel discard", "uffd", "native", "pass", kernel="6.18.0"),
        cell("kernel discard", "sigbus:memfd", "native", "n/a", "cannot", kernel="6.18.0")]


def test_merge_labels_rows_by_where_they_ran() -> None:
    merged = kernels.merge([("6.18", [cell("a", "uffd", "native", "pass", kernel="")]),
                            ("6.1", [{k: v for k, v in cell("a", "uffd", "native", "fail").items()
                                      if k != "reason"}])])
    assert merged == [cell("a", "uffd", "native", "pass", kernel="6.18"),
                      cell("a", "uffd", "native", "fail", kernel="6.1")]


def test_table_has_a_column_per_kernel_notes_and_totals() -> None:
    rows = kernels.merge([
        ("6.18", [cell("first touch", "uffd", "native", "pass"),
                  cell("first touch", "uffd", "unprivileged", "n/a", "no userfaultfd")]),
        ("6.1", [cell("first touch", "uffd", "native", "fail", "bytes differ"),
                 cell("first touch", "uffd", "unprivileged", "n/a", "no userfaultfd")]),
    ])
    lines = kernels.format_table(rows).splitlines()
    assert lines[0].split() == ["scenario", "backend", "profile", "6.18", "6.1"]
    assert lines[2].split() == ["first", "touch", "uffd", "native", "pass", "fail", "[1]", "*"]
    assert lines[3].split() == ["first", "touch", "uffd", "unprivileged", "n/a", "[2]", "n/a", "[2]"]
    assert "[1] bytes differ" in lines and "[2] no userfaultfd" in lines
    assert "* the result differs between kernels" in lines
    assert lines[-2:] == ["6.18: 1 pass, 0 fail, 1 n/a", "6.1: 0 pass, 1 fail, 1 n/a"]


def test_table_marks_a_cell_a_kernel_did_not_run() -> None:
    rows = kernels.merge([("6.18", [cell("a", "uffd", "native", "pass"),
                                    cell("b", "uffd", "native", "pass")]),
                          ("6.1", [cell("a", "uffd", "native", "pass")])])
    lines = kernels.format_table(rows).splitlines()
    assert lines[2].split() == ["a", "uffd", "native", "pass", "pass"]
    assert lines[3].split() == ["b", "uffd", "native", "pass", "-", "*"]


@pytest.mark.parametrize("spec, name, matches", [
    ("6.1", "linux-image-6.1.0-56-cloud-amd64", True),
    ("6.1", "linux-image-6.12.117+deb12-cloud-amd64", False),
    ("6.1", "linux-image-6.1.0-56-cloud-amd64-dbg", False),
    ("6.1", "linux-image-6.1.0-56-cloud-amd64-unsigned", False),
    ("6.12", "linux-image-6.12.117+deb12-cloud-amd64", True),
    ("6.12", "linux-image-6.12-cloud-amd64", False),  # the meta-package
    ("linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-9-cloud-amd64", True),
])
def test_kernel_specs_name_cloud_packages(spec: str, name: str, matches: bool) -> None:
    assert bool(kernels.package_pattern(spec).fullmatch(name)) is matches


def test_the_newest_package_wins() -> None:
    names = ["linux-image-6.1.0-9-cloud-amd64", "linux-image-6.1.0-56-cloud-amd64",
             "linux-image-6.1.0-47-cloud-amd64"]
    assert max(names, key=kernels.natural_key) == "linux-image-6.1.0-56-cloud-amd64"


def read_cpio(data: bytes) -> dict[str, tuple[int, tuple[int, int], bytes]]:
    """name -> (mode, owner, content) of a newc archive, as the kernel reads it."""
    entries, position = {}, 0
    while True:
        assert data[position:position + 6] == b"070701", position
        fields = [int(data[position + 6 + 8 * i:position + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, size, name_size = fields[1], fields[2], fields[3], fields[6], fields[11]
        name = data[position + 110:position + 110 + name_size - 1].decode()
        position += 110 + name_size
        position += -position % 4
        if name == "TRAILER!!!":
            assert position == len(data)
            return entries
        entries[name] = (mode, (uid, gid), data[position:position + size])
        position += size
        position += -position % 4


def test_cpio_archive_holds_the_tree_owned_by_root(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "bin" / "tool").chmod(0o700)
    (tmp_path / "data").write_bytes(b"abc")
    (tmp_path / "data").chmod(0o600)
    (tmp_path / "link").symlink_to("data")
    archive = io.BytesIO()
    kernels.write_cpio(archive, [*kernels._tree_entries(tmp_path), ("deep/made", b"up")],
                       devices=[("dev/console", 5, 1)])
    entries = read_cpio(archive.getvalue())
    assert entries["bin"][0] == stat.S_IFDIR | 0o755
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, (0, 0), b"#!/bin/sh\n")  # uid 65534 runs it
    assert entries["data"] == (stat.S_IFREG | 0o644, (0, 0), b"abc")
    assert entries["link"] == (stat.S_IFLNK | 0o777, (0, 0), b"data")
    assert entries["deep"][0] == stat.S_IFDIR | 0o755 and entries["deep/made"][2] == b"up"
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600


def test_skips_with_the_reason_where_qemu_is_missing(tmp_path: Path) -> None:
    environment = {**os.environ, "PATH": str(tmp_path)}  # no qemu-system-x86_64 on it
    completed = subprocess.run([sys.executable, str(PATH), "--no-host", "--cache", str(tmp_path)],
                               env=environment, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    for spec in kernels.DEFAULT_KERNELS:
        assert f"kernel {spec}: skipped: qemu-system-x86_64 not found" in completed.stdout
    assert not list(tmp_path.iterdir())  # nothing downloaded, nothing built
