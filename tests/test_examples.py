"""The examples in examples/ run at small sizes on every backend, check their own bytes, and fail
when a byte is wrong; the pytest plugin's example meets the purges the plugin injects."""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import backend_name, kernel_reclaims, run_python

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.requires("any_backend", "(every example makes regions)")


def run_example(name: str, *args: str, backend: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    return run_python(script=EXAMPLES / name, args=args, timeout=120,
                      env=None if backend is None else {"VRANGE_BACKEND": backend})


# (example, what it says it did, the last line of a run that checked every byte)
RUNS = {
    "tile_cache.py": ("the 2 hot tiles served again: 2 reloaded", "every tile received was right"),
    "zlib_chunks.py": ("read again: 64 chunks decompressed again", "every byte read was right"),
    "numpy_derived.py": ("32 chunks recomputed for that read", "every value read was right"),
}


@pytest.mark.parametrize("name", RUNS)
def test_example_runs_small_and_checks_every_byte(name: str, backend: str) -> None:
    if name == "tile_cache.py":
        pytest.importorskip("PIL", reason="the tile cache example decodes with Pillow (pip install "
                                          "'.[test]')")
    result = run_example(name, "--small", backend=backend)
    assert result.returncode == 0, result.stdout + result.stderr
    did, checked = RUNS[name]
    lines = result.stdout.splitlines()
    assert any(did in line for line in lines), result.stdout
    assert lines[-1] == checked
    assert "purge() gave back" in result.stdout
    assert f"backend {backend_name(backend)}" in result.stdout
    # Where the kernel reclaims this backend's memory, the example has it reclaim some.
    assert ("after the kernel reclaimed" in result.stdout) == kernel_reclaims(backend)
    assert "WRONG" not in result.stdout + result.stderr


# Each example run in-process with one thing made wrong: it must say so and exit 1.
BROKEN = {
    "tile_cache.py": """
        import contextlib, vrange
        served = vrange.Cache.borrow
        @contextlib.contextmanager
        def borrow(self, key):  # a server that hands out a wrong byte
            with served(self, key) as view:
                pixels = bytearray(view)
                pixels[0] ^= 1
                yield memoryview(pixels)
        vrange.Cache.borrow = borrow
    """,
    "zlib_chunks.py": """
        compress = example.compress_chunks  # the file the helper decompresses differs by a byte
        example.compress_chunks = lambda data, path: compress(data[:99] + b"#" + data[100:], path)
    """,
    "numpy_derived.py": """
        derive = example.derive  # what the region holds differs from what it is checked against
        example.derive = lambda points: derive(points) + 1e-9
    """,
}


@pytest.mark.parametrize("name", BROKEN)
def test_example_exits_1_when_a_byte_is_wrong(name: str) -> None:
    if name == "tile_cache.py":
        pytest.importorskip("PIL", reason="the tile cache example decodes with Pillow")
    code = (f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\n"
            f"import {name.removesuffix('.py')} as example\n"
            + textwrap.dedent(BROKEN[name]) + "sys.exit(example.main(['--small']))\n")
    result = run_python(code, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "WRONG" in result.stderr, result.stderr


def test_the_pytest_plugin_example_under_injected_purges() -> None:
    """examples/test_forgetful_cache.py run as its docstring says, in pytest processes with the
    plugin (``-p vrange``): both tests pass without purges; with a purge at every point the fixed
    cache still passes and the forgetful index fails, with the replay command."""
    options = ["-p", "no:cacheprovider", "-q"]
    clean = run_example("test_forgetful_cache.py", *options)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "2 passed" in clean.stdout

    fixed = run_example("test_forgetful_cache.py", *options, "--vrange-purge=every:1", "-k",
                        "snapshot")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    injected = re.search(r"vrange: (\d+) injected purges", fixed.stdout)
    assert injected and int(injected.group(1)) > 0, fixed.stdout
    assert "1 passed" in fixed.stdout

    forgetful = run_example("test_forgetful_cache.py", *options, "--vrange-purge=every:1", "-k",
                            "forgetful")
    assert forgetful.returncode == 1, forgetful.stdout + forgetful.stderr
    assert "assert 90 == 450" in forgetful.stdout
    assert "replay: pytest" in forgetful.stdout and "--vrange-purge=every:1" in forgetful.stdout
