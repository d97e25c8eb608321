"""Volatile memory ranges for Linux: what this machine allows, and vrange shown, measured and
tested on it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from ._backends import (BACKEND_ENVIRONMENT_VARIABLE, KNOWN_SPECS, DefaultBackend, default_backend,
                        features)
from ._feature_report import Features, ProbeOutcome
from ._tool import (INTERRUPTED_EXIT, USAGE_EXIT, ArgumentParser, UsageError, configure_logging,
                    interrupt_once)


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def _outcome(outcome: ProbeOutcome, ok_word: str = "ok") -> str:
    return ok_word if outcome.ok else f"no: {outcome.error}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "none"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def table_lines(rows: Sequence[tuple[str, str]], width: int, label_width: int | None = None,
                indent: int = 2, gap: int = 2) -> list[str]:
    """``(label, value)`` rows as lines of at most ``width`` characters: labels in a column as wide
    as the longest (at most a third of the width), values wrapped beside them, at least ``gap``
    spaces after the label. A label too long for its column stands on a line of its own, its value
    on the next lines: no cell ever runs into the next column."""
    if not rows:
        return []
    if label_width is None:
        label_width = max(len(label) for label, _ in rows)
    label_width = min(label_width, max(8, (width - indent) // 3))
    value_column = indent + label_width + gap
    value_width = max(16, width - value_column)
    lines: list[str] = []
    for label, value in rows:
        wrapped = textwrap.wrap(value, value_width, break_on_hyphens=False) or [""]
        if len(label) > label_width:
            lines.extend(" " * indent + part
                         for part in textwrap.wrap(label, max(8, width - indent)) or [""])
        else:
            lines.append(f"{' ' * indent}{label:<{label_width + gap}}{wrapped.pop(0)}".rstrip())
        lines.extend(" " * value_column + more for more in wrapped)
    return lines


def report_width() -> int:
    """The width of a report: the terminal's (or ``$COLUMNS``), 100 in a pipe."""
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def format_report(report: Features, default: DefaultBackend | None = None,
                  width: int | None = None) -> str:
    """The feature report as a human-readable table, with what regions made without
    ``backend=`` use (``default``: :func:`vrange._backends.default_backend`)."""
    width = report_width() if width is None else width
    default = default_backend() if default is None else default
    sections: list[tuple[str, list[tuple[str, str]]]] = []

    def heading(title: str) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        sections.append((title, rows))
        return rows

    uffd = report.userfaultfd
    rows = heading("Kernel")
    rows.append(("release", f"{report.kernel_release} ({report.machine})"))
    rows.append(("page size", str(report.page_size)))
    rows.append(("transparent huge pages", report.thp_mode or "unknown"))
    rows.append(("vm.max_map_count", str(report.max_map_count)))
    mappings = report.mappings()
    rows.append(("mappings", f"{mappings.in_use} in use by this process; memfd-trap regions "
                             f"reserve {mappings.reserved} of the {mappings.budget} vrange may use"))
    rows = heading("userfaultfd")
    rows.append(("access", f"{uffd.access} (serves faults inside syscalls: "
                           f"{_yes_no(uffd.serves_syscalls)})"))
    rows.append(("why", uffd.reason))
    rows.extend((f"open via {attempt.method}", _outcome(attempt.outcome))
                for attempt in uffd.attempts)
    rows.append(("vm.unprivileged_userfaultfd", str(uffd.unprivileged_userfaultfd_sysctl)))
    rows.append(("CAP_SYS_PTRACE", _yes_no(uffd.cap_sys_ptrace)))
    rows.append(("seccomp", uffd.seccomp_mode))
    rows.append(("device node", uffd.dev_node))
    rows.append(("API features", f"{uffd.api_features_mask:#x}: "
                                 + (" ".join(uffd.api_features) or "none")))
    rows.append(("API ioctls", " ".join(uffd.api_ioctls) or "none"))
    rows.append(("range ioctls", " ".join(uffd.range_ioctls) or "none"))
    rows = heading("madvise (probed on a scratch mapping)")
    rows.extend((f"MADV_{advice.name}", _outcome(advice.outcome, "accepted"))
                for advice in report.madvise)
    rows = heading("Memory")
    rows.append(("memfd_create", _outcome(report.memfd)))
    rows.append(("PSI /proc/pressure/memory", _outcome(report.psi.readable, "readable")
                 + f"; triggers: {_outcome(report.psi.triggers_writable, 'writable')}"
                 + (f"; some avg10={report.psi.some_avg10} full avg10={report.psi.full_avg10}"
                    if report.psi.readable.ok else "")))
    cgroup = report.cgroup
    rows.append(("memory cgroup", f"{cgroup.version} {cgroup.path or ''}".strip()))
    rows.append(("memory limit", _bytes(cgroup.memory_limit_bytes)
                 + (f" (set at {cgroup.limit_set_at})" if cgroup.limit_set_at else "")))
    rows.append(("memory usage", _bytes(cgroup.memory_usage_bytes)))
    rows = heading("Pressure policy (vrange.policy)")
    plan = report.pressure
    rows.append(("monitor signal", plan.signal))
    rows.append(("why", plan.reason))
    rows.append(("limit", _bytes(plan.limit_bytes)))
    rows.append(("purges when usage passes", f"{_bytes(plan.high_water_bytes)}, down to "
                 f"{_bytes(plan.low_water_bytes)} ({plan.usage_file})"))
    rows = heading("sigbus backend traps")
    for trap in report.sigbus_traps:
        state = "usable" if trap.usable else "not usable"
        reclaim = "the kernel reclaims" if trap.kernel_reclaims else "only vrange purges"
        rows.append((f"{trap.name} trap", f"{state} ({reclaim}): {trap.reason}" if trap.usable
                     else f"{state}: {trap.reason}"))
    rows = heading("Backends")
    for support in report.backends:
        trap_note = f" [{support.trap} trap]" if support.trap else ""
        reclaim = (" the kernel reclaims volatile pages." if support.kernel_reclaims
                   else " only vrange purges (the kernel cannot reclaim).") if support.usable else ""
        rows.append((support.name + trap_note, ("usable:" + reclaim + " " if support.usable
                                                else "not usable: ") + support.reason))
    rows.append(("auto", report.auto_reason))
    rows.append(("default backend", default.describe()))
    rows = heading("Fallbacks (features missing here, and what vrange does instead)")
    if not report.fallbacks:
        rows.append(("-", "none: every kernel feature vrange uses is here"))
    rows.extend((fallback.name, f"{fallback.missing}. {fallback.fallback}")
                for fallback in report.fallbacks)
    if report.probe_errors:
        rows = heading("Probe errors")
        rows.extend(("-", error) for error in report.probe_errors)

    lines = textwrap.wrap(f"vrange {__version__} feature report (probed in "
                          f"{report.probe_seconds * 1000:.1f} ms)", width)
    if default.from_environment:
        lines += textwrap.wrap(f"${BACKEND_ENVIRONMENT_VARIABLE} overrides auto: regions made "
                               f"without backend= use {default.describe()}", width)
    label_width = max(len(label) for _, section in sections for label, _ in section)
    for title, section in sections:
        lines += ["", *textwrap.wrap(title, width), *table_lines(section, width, label_width)]
    return "\n".join(lines)


def _command_features(args: argparse.Namespace) -> int:
    report = features()
    default = default_backend()
    if args.json:
        print(json.dumps({**report.as_dict(), "default_backend": default.as_dict()}, indent=2,
                         sort_keys=True))
    else:
        print(format_report(report, default))
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import command

    return command(args)


def _command_bench(args: argparse.Namespace) -> int:
    from .bench import command

    return command(args)


def _command_stress(args: argparse.Namespace) -> int:
    from .stress import command

    return command(args)


def _command_compat(args: argparse.Namespace) -> int:
    from .compat.runner import main as run_compat

    return run_compat(args)


def _features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import add_arguments

    add_arguments(parser)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(parser)


def _stress_arguments(parser: argparse.ArgumentParser) -> None:
    from .stress import add_arguments

    add_arguments(parser)


def _compat_arguments(parser: argparse.ArgumentParser) -> None:
    from .compat.runner import add_arguments

    add_arguments(parser)


@dataclass(frozen=True)
class Command:
    """A subcommand: its one line in ``--help``, its description, its options and its handler."""

    name: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("features", "what this kernel and process let vrange use",
            "Probe what this kernel and process allow (userfaultfd, madvise advice, memfd, PSI, the "
            "memory cgroup) and which backend regions use here, and why.",
            _features_arguments, _command_features),
    Command("demo", "a tile cache 3x larger than its memory allowance",
            "A decoded-tile vrange.Cache three times larger than the memory it may use, on every "
            "backend that runs here, next to 'keep everything' and 'recompute every time'. Exit "
            "status 1 if a tile read back wrong.",
            _demo_arguments, _command_demo),
    Command("bench", "what vrange costs, next to same-run baselines",
            "Measure what vrange costs (hits, faults, volatility calls, syscalls on purged "
            "memory), each figure next to a baseline measured in the same run.",
            _bench_arguments, _command_bench),
    Command("stress", "everything at once on every backend, bytes checked",
            "Threads x regions reading, writing, pinning, purging, forking at once, each backend "
            "in a child process, every byte checked. Exit status 1 if anything went wrong.",
            _stress_arguments, _command_stress),
    Command("compat", "the scenario matrix: backends x process profiles",
            "Run the same scenarios on every backend under every profile (each profile in a "
            "process of its own, each cell in a forked child with an alarm) and print the matrix. "
            "Exit status 1 if any cell failed.",
            _compat_arguments, _command_compat),
)
"""Every subcommand, in the order ``--help`` lists them."""

EPILOG = (f"Run '%(prog)s COMMAND --help' for a command's options. ${BACKEND_ENVIRONMENT_VARIABLE} "
          f"(one of {', '.join(KNOWN_SPECS)}) chooses the backend of regions made without "
          "backend=. Exit status: 0 success, 1 a check failed, 2 a bad option or environment, "
          "130 interrupted (Ctrl-C).")


def _program_name() -> str:
    """``vrange`` when started as the installed script, else ``python -m vrange``."""
    return "vrange" if sys.argv and Path(sys.argv[0]).name == "vrange" else "python -m vrange"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line: every command of :data:`COMMANDS`, one line each in ``--help``."""
    parser = ArgumentParser(prog=prog or _program_name(), description=__doc__, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"vrange {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.summary,
                                        description=command.description)
        command.add_arguments(subparser)
        subparser.set_defaults(handler=command.run, prog=subparser.prog)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers here, nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names of the subcommands ``parser`` accepts (for tests of ``--help``)."""
    return list(_subparsers(parser))


def check_backend_environment(command: str) -> None:
    """UsageError where ``$VRANGE_BACKEND`` names no backend spec (every command), or, for the
    demo (which runs on that backend alone), one that cannot run here."""
    spec = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or ""
    if not spec:
        return
    if spec not in KNOWN_SPECS:
        raise UsageError(f"${BACKEND_ENVIRONMENT_VARIABLE}={spec!r} is not a backend spec; choose "
                         f"one of {', '.join(KNOWN_SPECS)}, or unset it")
    if command == "demo":
        default = default_backend()
        if default.backend is None:
            raise UsageError(f"${BACKEND_ENVIRONMENT_VARIABLE}={spec}: {default.problem}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status (0, 1 a check failed, 2 usage, 130 interrupted)."""
    try:  # imports every command's module: a Ctrl-C here is no traceback either
        parser = build_parser()
    except KeyboardInterrupt:
        print(f"{_program_name()}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    args, extra = parser.parse_known_args(argv)  # a bad option: one line, SystemExit(2)
    if extra:  # said by the command's parser, which names the command
        _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging()
    try:
        with interrupt_once():
            check_backend_environment(args.command)
            code = int(args.handler(args))
    except UsageError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        code = INTERRUPTED_EXIT
    except BrokenPipeError:  # the reader went away (``| head``): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if code == INTERRUPTED_EXIT:
        print(f"{args.prog}: interrupted", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
