"""``python -m vrange``: the commands the README promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import python_command, run_python, syscalls_are_served, usable_specs, wait_until

import vrange


def run_vrange(*args: str, backend: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_python(module="vrange", args=args, timeout=timeout,
                      env=None if backend is None else {"VRANGE_BACKEND": backend})


def table_rows(output: str) -> dict[str, str]:
    """The demo's summary table: approach -> the rest of its row."""
    rows = {}
    for line in output.splitlines():
        for approach in ("vrange uffd", "vrange sigbus:uffd", "vrange sigbus:memfd",
                         "keep everything (dict)", "recompute every time"):
            if line.startswith(approach + " "):
                rows[approach] = line[len(approach):]
    return rows


def test_features_json_names_every_item() -> None:
    result = run_vrange("features", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("kernel_release", "page_size", "thp_mode", "userfaultfd", "madvise", "memfd", "psi",
                "cgroup", "backends", "auto_backend", "auto_reason", "probe_errors"):
        assert key in data, key
    uffd = data["userfaultfd"]
    for key in ("access", "serves_syscalls", "reason", "attempts", "api_features", "api_ioctls",
                "range_ioctls", "unprivileged_userfaultfd_sysctl", "cap_sys_ptrace", "seccomp_mode"):
        assert key in uffd, key
    assert set(data["madvise"]) == {"FREE", "COLD", "PAGEOUT", "POPULATE_READ", "POPULATE_WRITE",
                                    "GUARD_INSTALL"}
    assert set(data["backends"]) == {"uffd", "sigbus"}
    for key in ("readable", "triggers_writable"):
        assert "ok" in data["psi"][key]
    for key in ("version", "memory_limit_bytes"):
        assert key in data["cgroup"]
    # The JSON says what the in-process report says.
    report = vrange.features()
    assert data["userfaultfd"]["access"] == report.userfaultfd.access
    assert data["page_size"] == report.page_size
    assert data["probe_errors"] == []


def test_features_table_is_readable() -> None:
    result = run_vrange("features")
    assert result.returncode == 0, result.stderr
    for heading in ("Kernel", "userfaultfd", "madvise", "Memory", "Backends"):
        assert f"\n{heading}" in result.stdout
    assert "MADV_POPULATE_WRITE" in result.stdout
    assert vrange.features().userfaultfd.access in result.stdout


def test_demo_on_each_backend(backend: str) -> None:
    result = run_vrange("demo", "--quick", backend=backend)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == {f"vrange {backend}", "keep everything (dict)", "recompute every time"}
    assert all(" right" in row for row in rows.values()), rows
    *_, decodes = rows["recompute every time"].split("rss")[1].split()[:1] or ["?"]
    assert int(decodes) == 3000  # recompute decodes on every read
    efault = next(line for line in result.stdout.splitlines() if line.startswith(f"  vrange {backend}:"))
    if syscalls_are_served(backend):
        assert "waited for the refill" in efault
    else:
        assert "failed with EFAULT" in efault and "vrange.io.write() refilled and wrote 4.0 MiB" in efault


def test_demo_keeps_a_budget_where_it_cannot_confine_itself() -> None:
    result = run_vrange("demo", "--quick", "--budget-only", "--limit", "4M", "--cache", "32M",
                        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a byte budget of 4.0 MiB" in result.stdout
    rows = table_rows(result.stdout)
    for spec in vrange.available_backends():
        vrange_rows = [row for name, row in rows.items() if name.startswith(f"vrange {spec}")]
        assert vrange_rows and all(" budget " in row and " right" in row for row in vrange_rows)


@pytest.mark.hang_timeout(200)
@pytest.mark.requires("root", "(to make memory cgroups; otherwise the demo keeps a budget)")
def test_the_readme_demo_confines_itself_and_is_never_oom_killed() -> None:
    """The README's main job, as CI runs it: as root each run gets a memory cgroup a third of its
    cache; the kernel (or vrange's monitor, on the memfd trap) takes tiles back."""
    result = run_vrange("demo", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Each run is confined to 128.0 MiB" in result.stdout
    rows = table_rows(result.stdout)
    assert not any("killed" in row or "failed" in row for row in rows.values()), rows
    assert all(" right" in row for row in rows.values()), rows
    for approach, row in rows.items():
        if approach.startswith("vrange"):
            assert "kernel" in row or "pressure" in row, (approach, row)  # memory was given back
    assert "*" in rows["keep everything (dict)"]  # it needs more than the limit


@pytest.mark.requires("root", "(the demo confines itself to a memory cgroup)")
def test_a_limit_too_small_for_a_memory_cgroup_is_a_usage_error() -> None:
    """A cgroup of a few MiB cannot hold the run's Python process: every vrange run would be
    OOM-killed (exit status 1 and a table of kills). One line, exit status 2, naming the way out;
    a byte budget of that size is fine."""
    result = run_vrange("demo", "--limit", "4M", "--reads", "10")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "python -m vrange demo: error: --limit 4.0 MiB is too small for a memory cgroup: the "
        "Python process in it needs more (at least 16.0 MiB; --budget-only keeps a byte budget "
        "of any size instead)"]


def test_ctrl_c_while_the_commands_are_loaded_is_one_line() -> None:
    """A Ctrl-C in the first few tens of milliseconds, while main() imports the commands' modules
    to build the parser (before any command's own handling): one line and exit status 130, no
    traceback."""
    result = run_python("import sys\n"
                        "import vrange.cli as cli\n"
                        "def interrupted(parser):\n"
                        "    raise KeyboardInterrupt\n"
                        "cli.COMMANDS = (cli.COMMANDS[0], cli.Command('slow', 'x', 'x', "
                        "interrupted, lambda args: 0))\n"
                        "sys.exit(cli.main(['features']))")
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["python -m vrange: interrupted"]


def test_unknown_command_is_an_error() -> None:
    result = run_vrange("nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_bench_quick_reports_rows_against_a_baseline() -> None:
    result = run_vrange("bench", "--quick")
    assert result.returncode == 0, result.stderr
    specs = usable_specs(vrange.features())
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  fault/")]
    assert {row[0].split("/")[1] for row in rows} == set(specs)
    for row in rows:
        measured, baseline, _unit, ratio = row[1:5]
        assert float(measured) > 0 and float(baseline) > 0 and float(ratio) > 0


# --- the command line itself: help, errors, the features table, Ctrl-C, --json ----------------------

LONG_COMMANDS = ("demo", "bench", "stress", "compat")


def test_help_lists_every_subcommand_on_one_line() -> None:
    from vrange.cli import build_parser, subcommands

    registered = subcommands(build_parser())
    assert set(registered) == {"features", "demo", "bench", "stress", "compat"} | set(registered)
    result = run_python(module="vrange", args=["--help"], env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    section = lines[lines.index("commands:") + 1:]
    section = section[:section.index("")]
    listed = [line.split()[0] for line in section if line.startswith("    ")]
    assert listed == registered  # each once, in order, none missing
    for line in section:  # one line each: no wrapped continuation lines
        assert line.strip() == "COMMAND" or line.split()[0] in registered, line
        assert len(line) <= 80, line
    assert all(len(line.split(maxsplit=1)) == 2 for line in section if line.startswith("    "))


def test_the_installed_script_and_version() -> None:
    script = Path(sys.executable).parent / "vrange"
    if not script.exists():
        pytest.skip(f"no installed vrange script next to {sys.executable}")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: vrange "), result.stdout
    version = run_vrange("--version")
    assert version.returncode == 0 and version.stdout == f"vrange {vrange.__version__}\n"


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_table_lines_never_run_into_the_next_column(width: int) -> None:
    from vrange.cli import table_lines

    long_label = "a label far too long for the label column of any table"
    rows = [("short", "ok"), ("open via syscall_user_mode_only", "ok"), (long_label, "word " * 40),
            ("path", "/" + "x" * 300), ("empty", "")]
    lines = table_lines(rows, width)
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    value_column = lines[0].index("ok")
    assert lines[0] == "  short".ljust(value_column) + "ok"
    assert value_column >= min(len("  open via syscall_user_mode_only"), width // 3) + 2
    for label, value in rows:
        first = next(index for index, line in enumerate(lines) if line.startswith("  " + label[:8]))
        if len(label) + 4 <= value_column:  # it fits: the value starts in the value column
            assert lines[first].ljust(value_column)[:value_column] == \
                f"  {label}".ljust(value_column)
        else:  # it stands alone; its value comes on the next lines, in the value column
            assert not lines[first][value_column:].strip() or len(label) > value_column
            assert value[:4] in lines[first + 1 + len(label) // width]
        more = [line for line in lines[first + 1:] if line.startswith(" " * value_column)]
        assert all(len(line) <= width for line in more)
    # An unbreakable value is cut at the width, never pushed past it.
    parts = [line[value_column:] for line in lines]
    assert "".join(part for part in parts if part and set(part) <= set("/x")) == "/" + "x" * 300


@pytest.mark.parametrize("width", ["60", "100", "160"])
def test_the_features_table_fits_its_width(width: str) -> None:
    result = run_python(module="vrange", args=["features"], env={"COLUMNS": width})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= int(width) for line in lines), \
        [line for line in lines if len(line) > int(width)]
    for attempt in ("syscall", "dev", "syscall_user_mode_only"):
        label = f"  open via {attempt}"
        line = next(line for line in lines if line.startswith(label))
        rest = line[len(label):]
        assert rest == "" or rest.startswith("  "), line  # never "...user_mode_onlyok"


def _error_line(result: subprocess.CompletedProcess[str], prog: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["features", "demo", "bench", "stress", "compat"])
def test_a_bad_backend_environment_is_one_line_and_exit_2(command: str) -> None:
    from vrange._backends import KNOWN_SPECS

    line = _error_line(run_vrange(command, backend="bogus"), f"python -m vrange {command}")
    assert "'bogus'" in line and "$VRANGE_BACKEND" in line
    assert all(spec in line for spec in KNOWN_SPECS)  # the valid choices


@pytest.mark.parametrize("arguments, says", [
    (["nonsense"], "invalid choice: 'nonsense'"),
    ([], "the following arguments are required: COMMAND"),
    (["features", "--table"], "unrecognized arguments: --table"),
    (["demo", "--limit", "lots"], "not a size: 'LOTS'"),
    (["demo", "--reads", "0"], "--limit and --reads must be positive"),
    (["bench", "--repeats", "0"], "--repeats must be at least 1"),
    (["bench", "--rows", "no-such-row"], "no row matches"),
    (["stress", "--threads", "0"], "must be positive"),
    (["stress", "--threads", "100000"], "--threads must be at most 256"),
    (["stress", "--seconds", "inf"], "must be at most 86400"),
    (["stress", "--backend", "nope"], "unknown backend spec 'nope'"),
    (["compat", "--profile", "docker"], "unknown profile 'docker'"),
    (["compat", "--timeout", "soon"], "invalid float value: 'soon'"),
])
def test_a_bad_argument_is_one_line_and_exit_2(arguments: list[str], says: str) -> None:
    prog = " ".join(["python -m vrange", *arguments[:1]]) if arguments[:1] != ["nonsense"] \
        else "python -m vrange"
    line = _error_line(run_vrange(*arguments), prog)
    assert says in line, line


@pytest.mark.parametrize("arguments, env, says", [
    (["--reads", "0"], {}, "--limit and --reads must be positive"),
    (["--quick"], {"VRANGE_BACKEND": "bogus"}, "$VRANGE_BACKEND='bogus' is not a backend spec"),
])
def test_python_m_vrange_demo_follows_the_same_rules(arguments: list[str], env: dict[str, str],
                                                     says: str) -> None:
    """``python -m vrange.demo`` is ``python -m vrange demo``: a bad option or backend is one line
    and exit status 2, not a traceback (or a demo run on a backend that does not exist)."""
    result = run_python(module="vrange.demo", args=arguments, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr


def test_features_names_the_backend_override() -> None:
    from vrange._backends import default_backend

    report = vrange.features()
    auto = default_backend().auto
    plain = run_vrange("features")
    assert "default backend" in plain.stdout and "(auto; $VRANGE_BACKEND is not set)" in plain.stdout
    assert "overrides auto" not in plain.stdout
    spec = "sigbus:memfd" if report.trap("memfd").usable else "sigbus"
    if not report.backend("sigbus").usable:
        pytest.skip(f"needs the sigbus backend: {report.backend('sigbus').reason}")
    text = run_vrange("features", backend=spec)
    assert text.returncode == 0, text.stderr
    flat = " ".join(text.stdout.split())  # the table wraps long values
    assert "$VRANGE_BACKEND overrides auto: regions made without backend= use " in flat
    assert f"(from $VRANGE_BACKEND={spec}; auto would pick {auto})" in flat
    data = json.loads(run_vrange("features", "--json", backend=spec).stdout)["default_backend"]
    assert data["from_environment"] is True and data["spec"] == spec
    assert data["backend"].startswith("sigbus") and data["auto"] == auto
    assert f"$VRANGE_BACKEND={spec}" in data["text"]


def test_every_report_has_json_and_every_long_command_progress() -> None:
    from vrange.cli import _subparsers, build_parser

    for command, subparser in _subparsers(build_parser()).items():
        options = {option for action in subparser._actions for option in action.option_strings}
        assert "--json" in options, command  # features, demo, bench, stress, compat: reports
        if command in LONG_COMMANDS:
            assert "--progress" in options, command


def test_demo_json_reports_every_run() -> None:
    spec = usable_specs(vrange.features())[0]
    result = run_vrange("demo", "--quick", "--json", "--budget-only", backend=spec)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["bounded_by"] == "byte budget" and data["reads"] == 3000
    assert [run["approach"] for run in data["runs"]][1:] == ["keep everything (dict)",
                                                              "recompute every time"]
    assert all(run["correct"] for run in data["runs"])
    assert "vrange demo: a map of" in result.stderr  # the commentary goes to stderr


def _processes_marked(mark: str) -> list[int]:
    """The processes whose environment carries ``mark`` (a command's children inherit it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if mark.encode() in environ.read():
                    found.append(int(entry))
        except OSError:  # gone, or a zombie
            continue
    return found


def _vrange_cgroups(report: vrange.Features) -> set[str]:
    directory = report.cgroup.directory
    if directory is None or not os.path.isdir(directory):
        return set()
    return {name for name in os.listdir(directory) if name.startswith("vrange-")}


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("command, arguments, target", [
    ("demo", [], "group"), ("demo", [], "parent"),
    ("bench", ["--rows", "fault/*", "--repeats", "50"], "group"),
    ("stress", ["--seconds", "60"], "group"), ("stress", ["--seconds", "60"], "parent"),
    ("compat", [], "group"), ("compat", [], "parent"),
])
def test_ctrl_c_stops_cleanly(command: str, arguments: list[str], target: str,
                              tmp_path: Path, report: vrange.Features) -> None:
    """SIGINT to the process group (a terminal's Ctrl-C) or to the command alone (kill -INT): one
    line, exit status 130, no traceback, and nothing left: no process it started, no temporary
    file, no cgroup."""
    mark = f"VRANGE_TEST_MARK_{uuid.uuid4().hex}"
    cgroups_before = _vrange_cgroups(report)
    process = subprocess.Popen(
        python_command(module="vrange", args=[command, *arguments]), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, mark: "1", "TMPDIR": str(tmp_path)})
    try:
        time.sleep(1.5)
        assert process.poll() is None, "the command ended before it could be interrupted"
        wait_until(lambda: _processes_marked(mark) != [process.pid] or command == "bench",
                   "the command started its child processes")
        if target == "group":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == f"python -m vrange {command}: interrupted", stderr
    assert _processes_marked(mark) == []
    assert list(tmp_path.iterdir()) == []
    assert _vrange_cgroups(report) <= cgroups_before
