"""``python -m vrange bench``: the statistics core, row selection, the report's JSON, Ctrl-C and
--plot. Nothing here asserts a speed: the machines are shared and performance is never a test."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import python_command, run_python

from vrange.bench import (SPREAD_RULE, Summary, all_rows, compare, percentile, select,
                          summarize)


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_python(module="vrange", args=("bench", *args), timeout=timeout)


# --- the statistics core -----------------------------------------------------------------------------

def test_percentile_interpolates_between_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 5.0
    assert percentile(values, 0.1) == pytest.approx(1.4)
    assert percentile(values, 0.9) == pytest.approx(4.6)
    assert percentile([7.0], 0.9) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summary_of_fixed_samples() -> None:
    summary = summarize([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0])
    assert summary.median == pytest.approx(1.0)
    assert summary.p10 == pytest.approx(0.945)
    assert summary.p90 == pytest.approx(1.055)
    assert summary.count == 10
    assert not summary.wide and not summary.few and summary.note == ""


def test_wide_spread_and_few_repeats_are_flagged() -> None:
    wide = summarize([1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert wide.spread == pytest.approx(2.0) and wide.wide and "wide" in wide.note
    few = summarize([1.0, 1.0])
    assert few.few and not few.wide and "few" in few.note
    assert Summary(1.0, 1.0, 1.25, 9).wide is False  # the limit itself is still trusted
    assert "1.25" in SPREAD_RULE


def test_compare_interleaves_in_alternating_order_after_a_warm_up() -> None:
    calls: list[str] = []

    def measure() -> float:
        calls.append("m")
        return 2.0

    def baseline() -> float:
        calls.append("b")
        return 1.0

    samples = compare(measure, baseline, 4)
    assert calls == ["m", "b", "m", "b", "b", "m", "m", "b", "b", "m"]
    assert [sample.measured_first for sample in samples] == [True, False, True, False]
    assert all(sample.ratio == 2.0 for sample in samples)


# --- rows --------------------------------------------------------------------------------------------

def test_rows_have_unique_names_and_a_baseline() -> None:
    rows = all_rows()
    assert rows, "no backend can run here"
    names = [row.name for row in rows]
    assert len(names) == len(set(names))
    assert all(row.baseline and row.what and row.unit for row in rows)
    groups = {row.group for row in rows}
    assert groups >= {"hit", "fault", "floor", "latency", "volatility", "write", "throughput",
                      "alternatives"}
    contexts = {row.params["context"] for row in rows if row.group == "fault"}
    assert contexts == {"gil-held", "gil-released", "other-thread", "syscall", "random"}
    # A random walk is measured for the mechanism (native Zeros) only.
    assert {row.params["regenerator"] for row in rows
            if row.group == "fault" and row.params["context"] == "random"} == {"zeros"}
    assert {row.params["regenerator"] for row in rows if row.group == "fault"} == \
        {"zeros", "file", "python"}


def test_row_selection_by_glob_substring_and_quick() -> None:
    rows = all_rows()
    assert [row.name for row in select(rows, ["floor/*"], quick=False)] == \
        [row.name for row in rows if row.name.startswith("floor/")]
    assert all("numpy-sum" in row.name for row in select(rows, ["numpy-sum"], quick=False))
    quick = select(rows, None, quick=True)
    assert quick and len(quick) < len(rows) and all(row.quick for row in quick)
    assert select(rows, ["no-such-row"], quick=False) == []


# --- the command -------------------------------------------------------------------------------------

def test_json_without_a_path_is_the_only_thing_on_stdout() -> None:
    """``--json`` alone, as every other command takes it: the JSON on stdout, the table on stderr."""
    result = run_bench("--quick", "--rows", "hit/*", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rows"] and data["repeats"] == 1
    assert "ratio = measured / baseline" in result.stderr


def test_quick_json_has_every_documented_field(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    result = run_bench("--quick", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert "ratio = measured / baseline" in result.stdout
    data = json.loads(path.read_text())
    for key in ("vrange", "date", "command", "machine", "kernel", "python", "quick", "repeats",
                "interrupted", "spread_rule", "rows"):
        assert key in data, key
    assert data["quick"] is True and data["interrupted"] is False
    assert data["kernel"] == os.uname().release
    assert data["rows"]
    for row in data["rows"]:
        for key in ("name", "group", "what", "baseline", "unit", "params", "target", "samples",
                    "measured_median", "baseline_median", "ratio", "skipped", "error"):
            assert key in row, (row["name"], key)
        assert row["error"] is None, row
        if row["skipped"]:
            continue
        assert len(row["samples"]) == data["repeats"]
        assert row["baseline_median"] > 0 and row["measured_median"] > 0
        for key in ("median", "p10", "p90", "wide", "few"):
            assert key in row["ratio"]
        assert row["ratio"]["p10"] <= row["ratio"]["median"] <= row["ratio"]["p90"]
        assert all(sample["baseline"] > 0 and sample["ratio"] > 0 for sample in row["samples"])
        assert row["name"] in result.stdout


def test_rows_selects_and_repeats_counts() -> None:
    result = run_bench("--quick", "--rows", "fault/*/zeros/64K/gil-released", "--repeats", "2",
                       "--json", "-")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = [row["name"] for row in data["rows"]]
    assert names and all(name.startswith("fault/") and name.endswith("/zeros/64K/gil-released")
                         for name in names)
    assert all(len(row["samples"]) == 2 for row in data["rows"])
    assert "ratio = measured / baseline" in result.stderr  # the table goes to stderr with --json -


def test_list_and_no_match() -> None:
    listed = run_bench("--list")
    assert listed.returncode == 0 and "fault/" in listed.stdout and "floor/64K" in listed.stdout
    missing = run_bench("--rows", "no-such-row")
    assert missing.returncode == 2 and "no row matches" in missing.stderr


@pytest.mark.hang_timeout(90)
def test_ctrl_c_stops_cleanly_with_partial_results() -> None:
    process = subprocess.Popen(
        python_command(module="vrange", args=["bench", "--progress", "--quick", "--rows", "fault/*",
                                              "--repeats", "50"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        announced = process.stderr.readline()  # said at once, terminal or not
        assert announced.startswith("python -m vrange bench: measuring "), announced
        first = process.stderr.readline()
        assert first.startswith("[1/"), first
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=20)
        assert time.monotonic() - started < 20
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stdout + stderr
    assert "INTERRUPTED (Ctrl-C): partial results" in stdout
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "python -m vrange bench: interrupted"


def test_plot_needs_matplotlib_or_draws(tmp_path: Path) -> None:
    result = run_bench("--quick", "--rows", "floor/*", "--rows", "hit/no-thp/memoryview-copy",
                       "--repeats", "2", "--plot", str(tmp_path / "charts"))
    if importlib.util.find_spec("matplotlib") is None:
        assert result.returncode == 2
        assert "pip install 'vrange[plot]'" in result.stderr
        assert not (tmp_path / "charts").exists()
    else:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "charts" / "hit.png").stat().st_size > 0


def test_rows_needing_numpy_say_so_when_it_is_missing() -> None:
    result = run_python("""
        import json, sys
        sys.modules["numpy"] = None  # import numpy now raises ImportError
        from vrange.cli import main
        sys.exit(main(["bench", "--quick", "--rows", "hit/*", "--repeats", "1", "--json", "-"]))
    """)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["rows"]}
    numpy_rows = [row for name, row in rows.items() if "numpy" in name]
    assert numpy_rows and all(row["skipped"] == "skipped: numpy not installed" and not row["samples"]
                              for row in numpy_rows)
    assert all(row["samples"] for name, row in rows.items() if "numpy" not in name)
