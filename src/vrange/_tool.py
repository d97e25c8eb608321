"""What every ``python -m vrange`` command shares: one-line errors, Ctrl-C, child processes,
progress and logging.

Conventions (see docs/features.md, "The command line"):

- a bad option, or a bad ``$VRANGE_BACKEND``, is one line on stderr, ``PROG: error: MESSAGE``, and
  exit status 2 (:data:`USAGE_EXIT`), never a traceback;
- a long command says on stderr what it is about to do as it starts, shows progress on stderr when
  it is a terminal (or with ``--progress``), and stops on Ctrl-C: the first SIGINT raises
  :class:`KeyboardInterrupt` (later ones are ignored, so that the clean-up it starts is not cut
  short), child processes are killed with everything they started, their cgroups and temporary
  files are removed, and the command ends with ``PROG: interrupted`` and exit status 130
  (:data:`INTERRUPTED_EXIT`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

USAGE_EXIT = 2
INTERRUPTED_EXIT = 130
LOG_FORMAT = "%(name)s: %(message)s"
"""The command line's log lines: the logger's name is the one prefix (``vrange: ...``)."""


class UsageError(Exception):
    """A bad option or environment: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: MESSAGE``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def configure_logging() -> None:
    """Show the warnings vrange logs on stderr, each line prefixed once with its logger's name."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)


def announce(args: argparse.Namespace, text: str) -> None:
    """One line on stderr as a long command starts, terminal or not."""
    print(f"{args.prog}: {text}", file=sys.stderr, flush=True)


def show_progress(args: argparse.Namespace, stream: TextIO | None = None) -> bool:
    """Whether to show progress: on a terminal, or with ``--progress``."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(args, "progress", False)) or stream.isatty()


class StatusLine:
    """Progress on a stream: one line rewritten in place on a terminal, otherwise one line per
    update."""

    def __init__(self, stream: TextIO, width: int = 150) -> None:
        self.stream = stream
        self.terminal = stream.isatty()
        self.width = width
        self.shown = False

    def show(self, text: str) -> None:
        if self.terminal:
            self.stream.write("\r\033[K" + text[:self.width])
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (on a terminal), before other output."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


class _InterruptState:
    """Where the first SIGINT goes: raised at once, or held while a child process is being started
    (a KeyboardInterrupt raised inside ``subprocess.Popen`` after its fork would leave the child
    running with nobody to kill it)."""

    held = 0          # depth of ``interrupts_held`` blocks
    pending = False   # a SIGINT arrived while held


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """For the block (main thread only): the first SIGINT raises KeyboardInterrupt (or, inside
    :func:`interrupts_held`, when that block ends) and every later one is ignored, until the
    process ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(number: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _InterruptState.held:
            _InterruptState.pending = True
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:  # not interrupted: as it was
            signal.signal(signal.SIGINT, previous)


def interrupts_held() -> contextlib.AbstractContextManager[None]:
    """A block the first Ctrl-C does not cut: :func:`interrupt_once`'s KeyboardInterrupt is raised
    when the outermost such block ends instead (main thread; elsewhere nothing changes)."""
    return _held_block()


@contextlib.contextmanager
def _held_block() -> Iterator[None]:
    _InterruptState.held += 1
    try:
        yield
    finally:
        _InterruptState.held -= 1
        if not _InterruptState.held and _InterruptState.pending:
            _InterruptState.pending = False
            raise KeyboardInterrupt


def _status(pid: int) -> tuple[str, int] | None:
    """``(state, process group)`` of a process from /proc, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[2])


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie left for a parent to reap has)."""
    status = _status(pid)
    return status is None or status[0] in "ZX"


def group_members(group: int) -> list[int]:
    """The processes of process group ``group`` still running (zombies left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            status = _status(int(entry))
            if status is not None and status[1] == group and status[0] not in "ZX":
                members.append(int(entry))
    return members


def kill_process_group(process: subprocess.Popen[Any], seconds: float = 5.0) -> None:
    """Kill ``process`` and every process of its group (what it forked or started), reap it, and
    wait (up to ``seconds``) until the others have ended too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()
    deadline = time.monotonic() + seconds
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


@contextlib.contextmanager
def child_process(command: Sequence[str], **options: Any) -> Iterator[subprocess.Popen[Any]]:
    """``subprocess.Popen(command, **options)`` in a session of its own, so that a terminal's
    Ctrl-C reaches only this process. When the block ends with an exception (Ctrl-C), the child is
    killed with its whole process group (its forks and helper processes) before the pipes are
    closed and it is reaped."""
    held = interrupts_held()
    held.__enter__()  # a Ctrl-C during Popen is raised below, once the child can be killed
    try:
        process = subprocess.Popen(command, start_new_session=True, **options)
    except BaseException:
        held.__exit__(None, None, None)
        raise
    with process:
        try:
            held.__exit__(None, None, None)  # raises a Ctrl-C that came meanwhile
            yield process
        except BaseException:
            kill_process_group(process)
            raise


def remove_cgroup(path: Path, seconds: float = 2.5) -> None:
    """Remove the cgroup directory ``path``, retrying while the processes just killed or reaped in
    it are still leaving it; gives up quietly after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
