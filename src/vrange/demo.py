"""``python -m vrange demo``: a decoded-tile cache larger than the memory it may use.

The workload: a map of compressed tiles (zlib, generated deterministically; nothing is downloaded)
read with a skewed access pattern (most reads hit a hot tenth of the map), each read decoded tile
checked against its CRC-32. The decoded tiles live in a :class:`vrange.Cache` (a mapping of byte
values in volatile memory: a tile taken back is decoded again on its next read) three times larger
than the memory the process may use, on each usable backend. As root the demo confines each run to a memory
cgroup beneath its own (``--limit``, 128 MiB by default), so the pressure is real: the kernel (or
vrange's pressure monitor, on the memfd trap) takes tiles back instead of the OOM killer taking the
process. Otherwise it keeps the same amount with a byte budget (:func:`vrange.policy.set_budget`).
The same workload also runs as "keep everything" (a dict of decoded tiles) and "recompute every
time" (decode on every read), for the comparison table at the end.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from ._backends import usable_specs
from ._tool import (StatusLine, UsageError, child_process, configure_logging, remove_cgroup,
                    show_progress)

if TYPE_CHECKING:
    from .region import BackendName

TILE = 64 << 10
DISTINCT_SOURCES = 64
HOT_FRACTION = 0.1
HOT_SHARE = 0.9
SEED = 2014
MIN_CONFINED_LIMIT = 16 << 20
"""The smallest memory cgroup a run is confined to: the interpreter, vrange and the workload's
own memory take about 10 MiB, and a run under 8 MiB is OOM-killed before its cache matters."""


def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def parse_size(text: str) -> int:
    """``128M``, ``1G``, ``65536``: bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 128M)") from None


# --- the tiles ---------------------------------------------------------------------------------


class TileSource:
    """Compressed tiles and how to decode them: tile ``t`` is one of a few deterministic "images",
    decompressed, then recoloured with a per-tile byte table (so every tile differs)."""

    def __init__(self) -> None:
        generator = random.Random(SEED)
        noise = int.from_bytes(generator.randbytes(TILE), "little") & int.from_bytes(
            b"\x0f" * TILE, "little")
        gradient = bytes(range(256)) * (TILE // 256)
        self.compressed = []
        for image in range(DISTINCT_SOURCES):
            table = bytes((value * (2 * image + 1) // 3 + image * 37) % 256 for value in range(256))
            pixels = (int.from_bytes(gradient.translate(table), "little") ^ noise).to_bytes(
                TILE, "little")
            self.compressed.append(zlib.compress(pixels, 6))
        self.tables = [bytes((value + tile * 11) % 256 for value in range(256))
                       for tile in range(256)]

    def decode(self, tile: int) -> bytes:
        pixels = zlib.decompress(self.compressed[tile % DISTINCT_SOURCES])
        return pixels.translate(self.tables[(tile // DISTINCT_SOURCES) % 256])

    @property
    def compressed_bytes(self) -> int:
        return sum(len(data) for data in self.compressed)


def workload(tiles: int, reads: int) -> list[int]:
    """The tiles read, in order: most reads on a hot tenth of the map, the rest anywhere."""
    generator = random.Random(SEED + tiles)
    hot = max(1, int(tiles * HOT_FRACTION))
    return [generator.randrange(hot) if generator.random() < HOT_SHARE
            else generator.randrange(tiles) for _ in range(reads)]


def expected_checksums(source: TileSource, tiles: int) -> array[int]:
    return array("I", (zlib.crc32(source.decode(tile)) for tile in range(tiles)))


def load_checksums(path: str) -> array[int]:
    checksums = array("I")
    with open(path, "rb") as file:
        checksums.frombytes(file.read())
    return checksums


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- one run, in a process of its own -------------------------------------------------------------


@dataclass
class RunResult:
    approach: str
    seconds: float
    peak_rss: int
    regenerations: int
    purges: dict[str, int]
    correct: bool
    note: str = ""
    efault: str = ""


def _write_from_purged_memory(cache: object, length: int) -> str:
    """Write purged memory to a pipe: raw (uffd: the syscall waits for the refill; sigbus: EFAULT),
    then through vrange.io (works everywhere)."""
    from . import io as vrange_io

    read_end, write_end = os.pipe()
    drained: list[int] = []
    drain = threading.Thread(target=lambda: drained.append(
        sum(len(block) for block in iter(lambda: os.read(read_end, 1 << 20), b""))))
    drain.start()
    view = memoryview(cache)  # type: ignore[arg-type]
    try:
        written = os.write(write_end, view[:length])
        outcome = (f"os.write() straight from purged memory wrote {_mib(written)} (the syscall "
                   "waited for the refill instead of failing with EFAULT)")
    except OSError as error:
        written = vrange_io.write(write_end, view[:length])
        outcome = (f"os.write() from purged memory failed with {errno.errorcode[error.errno or 0]}"
                   f" (this backend's documented limit); vrange.io.write() refilled and wrote "
                   f"{_mib(written)}")
    finally:
        view.release()
        os.close(write_end)
        drain.join()
        os.close(read_end)
    return outcome


def run_worker(spec: BackendName, tiles: int, reads: int, budget: int | None, checksums_path: str,
               progress: Callable[[dict[str, object]], None]) -> RunResult:
    """The vrange run: a :class:`vrange.Cache` room for all ``tiles`` decoded tiles, read with
    ``borrow`` (no copy); a tile the kernel (or vrange) took back is decoded again."""
    import vrange
    import vrange.policy

    source = TileSource()
    checksums = load_checksums(checksums_path)
    order = workload(tiles, reads)
    regenerated = [0]

    def decode(tile: int) -> bytes:
        regenerated[0] += 1
        return source.decode(tile)

    # With a budget (no memory cgroup to confine the run), every backend's region is put under the
    # policy through its group; under a cgroup, the kernel reclaims (uffd, sigbus:uffd) and vrange's
    # monitor purges what the kernel cannot (sigbus:memfd).
    group = None
    if budget is not None:
        group = "tiles"
        vrange.policy.set_budget(budget, group=group)
    started = time.perf_counter()
    correct = True
    with vrange.Cache(tiles * TILE, decode, backend=spec, chunk_size=TILE, group=group) as cache:
        region = cache.region
        step = max(1, reads // 20)
        for index, tile in enumerate(order):
            # Pinned while it is borrowed, volatile again afterwards: the tiles used least
            # recently are the first to go. A tile taken back is decoded again (a reload).
            with cache.borrow(tile) as view:
                if zlib.crc32(view) != checksums[tile]:
                    correct = False
            if (index + 1) % step == 0 or index + 1 == reads:
                stats = cache.stats()
                progress({"reads": index + 1, "hits": stats.hits,
                          "regenerations": stats.misses + stats.reloads,
                          "purges": region.stats().purges, "resident": stats.resident_bytes})
        seconds = time.perf_counter() - started
        region_stats = region.stats()
        purges = {reason: count for reason, count in region_stats.purges_by_reason.items()
                  if count}
        region.purge(0, 4 << 20)
        efault = _write_from_purged_memory(region, 4 << 20)
        spec_name = f"{region.backend}:{region.trap}" if region.trap else region.backend
    return RunResult(f"vrange {spec_name}", seconds, _peak_rss(), regenerated[0], purges, correct,
                     efault=efault)


def run_keep_everything(tiles: int, reads: int, checksums_path: str) -> RunResult:
    source = TileSource()
    checksums = load_checksums(checksums_path)
    started = time.perf_counter()
    decoded: dict[int, bytes] = {}
    correct = True
    for tile in workload(tiles, reads):
        data = decoded.get(tile)
        if data is None:
            data = decoded[tile] = source.decode(tile)
        correct &= zlib.crc32(data) == checksums[tile]
    return RunResult("keep everything (dict)", time.perf_counter() - started, _peak_rss(),
                     len(decoded), {}, correct)


def run_recompute(tiles: int, reads: int, checksums_path: str) -> RunResult:
    source = TileSource()
    checksums = load_checksums(checksums_path)
    started = time.perf_counter()
    correct = True
    for tile in workload(tiles, reads):
        correct &= zlib.crc32(source.decode(tile)) == checksums[tile]
    return RunResult("recompute every time", time.perf_counter() - started, _peak_rss(), reads,
                     {}, correct)


# --- the parent: a memory cgroup, child processes, the table ----------------------------------------


def _own_memory_cgroup() -> tuple[str, Path] | None:
    """(version, directory) of this process's memory cgroup, when one is mounted."""
    from ._backends._probes import cgroup_directory, cgroup_mounts

    v1_mount, v2_mount = cgroup_mounts()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        if "memory" in controllers.split(",") and v1_mount:
            return "v1", cgroup_directory(v1_mount, own)
        if controllers == "" and v2_mount:
            parent = cgroup_directory(v2_mount, own)
            if "memory" in (parent / "cgroup.controllers").read_text().split():
                return "v2", parent
    return None


@contextmanager
def memory_cgroup(limit: int, name: str) -> Iterator[tuple[str, Path] | None]:
    """A memory cgroup beneath this process's own, limited to ``limit`` bytes, removed afterwards;
    None when this process cannot make one (not root, no memory controller) or ``limit`` is 0."""
    own = _own_memory_cgroup() if os.geteuid() == 0 and limit > 0 else None
    if own is None:
        yield None
        return
    version, parent = own
    path = parent / f"vrange-demo-{os.getpid()}-{name}"
    try:
        path.mkdir()
        (path / ("memory.limit_in_bytes" if version == "v1" else "memory.max")).write_text(str(limit))
    except OSError:
        yield None
        return
    try:
        yield version, path
    finally:
        remove_cgroup(path)  # the run's process was reaped (or killed, on Ctrl-C) just before


def _cgroup_peak(version: str, path: Path) -> int | None:
    name = "memory.max_usage_in_bytes" if version == "v1" else "memory.peak"
    try:
        return int((path / name).read_text())
    except (OSError, ValueError):
        return None


def _child(arguments: list[str], cgroup: Path | None,
           on_line: Callable[[dict[str, object]], None]) -> RunResult | str:
    """Run ``python -m vrange.demo --worker ...``; returns its result or why it failed."""
    command = [sys.executable, "-m", "vrange.demo", "--worker", *arguments]
    if cgroup is not None:
        command += ["--cgroup-procs", str(cgroup / "cgroup.procs")]
    with child_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) as process:
        assert process.stdout is not None and process.stderr is not None
        result: RunResult | None = None
        for line in process.stdout:
            message = json.loads(line)
            if "progress" in message:
                on_line(message["progress"])
            else:
                result = RunResult(**message["result"])
        error = process.stderr.read()
        process.wait()
    if process.returncode == -signal.SIGKILL:
        return "killed (SIGKILL: the OOM killer)"
    if process.returncode != 0 or result is None:
        return f"failed (exit {process.returncode}): {error.strip()[-300:]}"
    return result


def _usable_specs() -> list[str]:
    chosen = os.environ.get("VRANGE_BACKEND")
    return [chosen] if chosen else usable_specs()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m vrange demo``; ``python -m vrange.demo`` is the same command)."""
    parser.add_argument("--limit", type=parse_size, default=parse_size("128M"),
                        help="memory the cache may use: a memory cgroup as root, else a budget "
                             "(default 128M)")
    parser.add_argument("--cache", type=parse_size, default=None,
                        help="size of the decoded-tile map (default: three times the limit)")
    parser.add_argument("--reads", type=int, default=30000, help="tile reads per run (30000)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (32M, 3000 reads)")
    parser.add_argument("--budget-only", action="store_true",
                        help="keep the cache in bounds with a byte budget even as root")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (the running commentary goes "
                             "to stderr)")
    parser.add_argument("--progress", action="store_true",
                        help="show each run's progress on stderr even when it is not a terminal")


def check_arguments(args: argparse.Namespace) -> None:
    """UsageError for option values the demo cannot run with."""
    if args.limit <= 0 or args.reads <= 0 or (args.cache is not None and args.cache < TILE):
        raise UsageError(f"--limit and --reads must be positive and --cache at least one tile "
                         f"({_mib(TILE)})")


@dataclass
class DemoReport:
    """What :func:`run` did: the workload, how memory was bounded, and each approach's result
    (or why its run failed)."""

    tiles: int
    reads: int
    limit: int
    confined: bool
    results: list[RunResult | tuple[str, str]]

    @property
    def ok(self) -> bool:
        """Every run finished and every tile read back was right."""
        return all(isinstance(result, RunResult) and result.correct for result in self.results)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "tiles": self.tiles, "tile_bytes": TILE, "reads": self.reads,
                "limit_bytes": self.limit,
                "bounded_by": "memory cgroup" if self.confined else "byte budget",
                "runs": [result.__dict__ if isinstance(result, RunResult)
                         else {"approach": result[0], "failed": result[1]}
                         for result in self.results]}


def command(args: argparse.Namespace) -> int:
    """``python -m vrange demo``: 0 when every tile read back was right on every run."""
    check_arguments(args)
    commentary = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=commentary, flush=True)

    report = run(args, say, StatusLine(sys.stderr) if show_progress(args) else None)
    if report is None:
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


def run(args: argparse.Namespace | None = None, say: Callable[[str], None] = print,
        status: StatusLine | None = None) -> DemoReport | None:
    """Run the demo, telling what happens with ``say`` (and each run's progress on ``status``);
    the report, or None when no backend can run here."""
    if args is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args([])
    check_arguments(args)
    if args.quick:
        args.limit, args.reads = min(args.limit, 32 << 20), min(args.reads, 3000)
    confined = not args.budget_only and os.geteuid() == 0 and _own_memory_cgroup() is not None
    if confined and args.limit < MIN_CONFINED_LIMIT:
        raise UsageError(f"--limit {_mib(args.limit)} is too small for a memory cgroup: the Python "
                         f"process in it needs more (at least {_mib(MIN_CONFINED_LIMIT)}; "
                         "--budget-only keeps a byte budget of any size instead)")
    cache_bytes = args.cache or 3 * args.limit
    tiles = max(1, cache_bytes // TILE)
    specs = _usable_specs()
    if not specs:
        from ._backends import features

        say(f"No backend can run here: {features().auto_reason}")
        say("Run `python -m vrange features` for the details.")
        return None
    source = TileSource()
    say(f"vrange demo: a map of {tiles} tiles ({_mib(tiles * TILE)} decoded, "
        f"{_mib(source.compressed_bytes)} compressed sources), {args.reads} reads, "
        f"{int(HOT_SHARE * 100)}% of them on a hot {int(HOT_FRACTION * 100)}%")
    results: list[RunResult | tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as directory:
        checksums_path = os.path.join(directory, "checksums")
        with open(checksums_path, "wb") as file:
            file.write(expected_checksums(source, tiles).tobytes())
        common = ["--tiles", str(tiles), "--reads", str(args.reads), "--checksums", checksums_path]
        if confined:
            say(f"Each run is confined to {_mib(args.limit)}: a memory cgroup beneath this "
                "process's own, one per run")
            budget_arguments: list[str] = []
        else:
            say(f"Not root (or no memory cgroup): a byte budget of {_mib(args.limit)} keeps the "
                "resident cache in bounds instead (vrange.policy.set_budget)")
            budget_arguments = ["--budget", str(args.limit)]
        for spec in specs:
            label = f"vrange {spec}"
            last: list[str] = []

            def show(progress: dict[str, object], label: str = label,
                     last: list[str] = last) -> None:
                line = (f"  {label:<20} reads {progress['reads']:>6}  hits {progress['hits']:>6}"
                        f"  regenerations {progress['regenerations']:>6}  purges "
                        f"{progress['purges']:>6}  resident "
                        f"{_mib(float(progress['resident']))}")  # type: ignore[arg-type]
                last[:] = [line]
                if status is not None:
                    status.show(line)

            with memory_cgroup(args.limit if confined else 0, spec.replace(":", "-")) as cgroup:
                outcome = _child(["--spec", spec, *common, *budget_arguments],
                                 cgroup[1] if cgroup else None, show)
                peak = _cgroup_peak(*cgroup) if cgroup else None
            if status is not None:
                status.clear()
            if last:
                say(last[0])
            if isinstance(outcome, RunResult) and peak is not None:
                outcome.peak_rss = peak
                outcome.note = "cgroup peak"
            results.append(outcome if isinstance(outcome, RunResult) else (label, outcome))
        for approach, flag in (("keep everything (dict)", "--keep-everything"),
                               ("recompute every time", "--recompute")):
            outcome = _child([flag, *common], None, lambda progress: None)
            results.append(outcome if isinstance(outcome, RunResult) else (approach, outcome))
    say("")
    say(format_table(results, args.limit))
    efaults = [(result.approach, result.efault) for result in results
               if isinstance(result, RunResult) and result.efault]
    if efaults:
        say("")
        say("A system call on purged memory:")
        for approach, outcome in efaults:
            say(f"  {approach}: {outcome}")
    return DemoReport(tiles, args.reads, args.limit, confined, results)


def format_table(results: list[RunResult | tuple[str, str]], limit: int) -> str:
    header = (f"{'approach':<26}{'wall':>8}{'peak memory':>14}{'decodes':>10}  "
              f"{'purges (reason)':<26}{'bytes':<8}")
    lines = [f"Same workload, same run (memory allowed to the cache: {_mib(limit)}):", header]
    for result in results:
        if isinstance(result, tuple):
            lines.append(f"{result[0]:<26}{result[1]}")
            continue
        purges = ", ".join(f"{count} {reason}" for reason, count in result.purges.items()) or "-"
        over = " *" if result.approach.startswith("keep") and result.peak_rss > limit else ""
        peak = _mib(result.peak_rss) + ("" if result.note == "cgroup peak" else " rss")
        lines.append(f"{result.approach:<26}{result.seconds:>7.2f}s{peak:>14}"
                     f"{result.regenerations:>10}  {purges:<26}"
                     f"{'right' if result.correct else 'WRONG':<8}{over}")
    lines.append("peak memory: the run's memory cgroup peak, or \"rss\": its peak resident set size")
    if any(line.endswith(" *") for line in lines):
        lines.append(f"* needs more than the {_mib(limit)} the others were allowed (run without "
                     "a limit: under it, it would be OOM-killed)")
    return "\n".join(lines)


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec")
    parser.add_argument("--keep-everything", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--tiles", type=int, required=True)
    parser.add_argument("--reads", type=int, required=True)
    parser.add_argument("--checksums", required=True)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--cgroup-procs")
    args = parser.parse_args(list(argv))
    configure_logging()
    if args.cgroup_procs:
        with open(args.cgroup_procs, "w") as procs:
            procs.write(str(os.getpid()))

    def emit(message: dict[str, object]) -> None:
        print(json.dumps(message), flush=True)

    if args.keep_everything:
        result = run_keep_everything(args.tiles, args.reads, args.checksums)
    elif args.recompute:
        result = run_recompute(args.tiles, args.reads, args.checksums)
    else:
        result = run_worker(args.spec, args.tiles, args.reads, args.budget, args.checksums,
                            lambda progress: emit({"progress": progress}))
    emit({"result": result.__dict__})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    from .cli import main  # the command line's conventions: one-line errors, exit 2, Ctrl-C

    sys.exit(main(["demo", *sys.argv[1:]]))
