"""cffi build script for the vrange native core (out-of-line API mode).

Run by setuptools through ``cffi_modules`` in setup.py; never at import time. The C lives in real
``.c`` files beside this script, one per concern; the declarations cffi exposes to Python are read
from the marked blocks of the headers, so they are written once.

``VRANGE_SANITIZE`` (e.g. ``address,undefined``) builds the native core with those sanitizers
(``-fsanitize=... -fno-omit-frame-pointer -g -O1``, compile and link), for ``.ci/sanitizers``. The
resulting extension only loads with the sanitizer runtime preloaded (``LD_PRELOAD=$(gcc
-print-file-name=libasan.so)``), because the Python executable is not built with it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
C_SOURCES = [
    "clock.c",
    "signal_chain.c",
    "common.c",
    "userfaultfd.c",
    "probe.c",
    "seccomp.c",
    "uffd_handler.c",
    "region.c",
    "uffd_workers.c",
    "uffd_fault.c",
    "sigbus.c",
    "sigbus_memfd_trap.c",
    "sigbus_uffd_trap.c",
    "pressure.c",
    "python_regenerator.c",
    "isolated.c",
    "gil_switching.c",
    "bench.c",
]

# The functions and types exported to Python are declared once, in the headers, between
# "cffi: begin" and "cffi: end" markers; cffi cannot read the headers themselves (macros, system
# types, inline functions), so only those blocks are handed to it.
EXPORTING_HEADERS = ["common.h", "isolated.h", "region.h", "gil_switching.h", "uffd_backend.h",
                     "sigbus_backend.h", "pressure.h"]
EXPORTED_BLOCK = re.compile(r"/\* cffi: begin[^*]*\*/(.*?)/\* cffi: end \*/", re.S)


def exported_declarations() -> str:
    blocks = []
    for name in EXPORTING_HEADERS:
        blocks += EXPORTED_BLOCK.findall((NATIVE_DIR / name).read_text())
    if not blocks:
        raise RuntimeError("no exported declarations found in the vrange headers")
    return "\n".join(blocks)


# The Python callback (defined by cffi itself) and the constants Python needs, whose values cffi
# reads from the headers at build time.
CDEF_CALLBACK = """
extern "Python+C" int vr_python_regenerate(void *python_handle, uint64_t offset, char *buf,
                                           size_t len, int flags);
"""

CDEF_CONSTANTS = """
#define VR_SOURCE_ZEROS ...
#define VR_SOURCE_FILE ...
#define VR_SOURCE_PYTHON ...
#define VR_SOURCE_ISOLATED ...
#define VR_ISOLATED_SLOTS ...
#define VR_ON_ERROR_POISON ...
#define VR_ON_ERROR_ZEROS ...
#define VR_ON_ERROR_ABORT ...
#define VR_CHUNK_VOLATILE ...
#define VR_CHUNK_MATERIALIZED ...
#define VR_CHUNK_PURGED ...
#define VR_CHUNK_POISONED ...
#define VR_CHUNK_IN_FLIGHT ...
#define VR_CHUNK_TRAPPED ...
#define VR_TRAP_MEMFD ...
#define VR_PURGE_EXPLICIT ...
#define VR_PURGE_PRESSURE ...
#define VR_PURGE_BUDGET ...
#define VR_PURGE_KERNEL ...
#define VR_MAX_GROUPS ...
#define VR_TRAP_UFFD ...
#define VR_NATIVE_VERSION ...
#define VR_KERNEL_NO_POPULATE_WRITE ...
#define VR_KERNEL_NO_PAGEOUT ...
#define VR_KERNEL_NO_POISON ...
#define VR_KERNEL_NO_UFFD_THREAD_ID_SIGBUS ...
#define O_CLOEXEC ...
#define O_NONBLOCK ...
#define UFFD_USER_MODE_ONLY ...
#define MADV_DONTNEED ...
#define MADV_FREE ...
#define MADV_COLD ...
#define MADV_PAGEOUT ...
#define MADV_POPULATE_READ ...
#define MADV_POPULATE_WRITE ...
#define MADV_COLLAPSE ...
#define MADV_GUARD_INSTALL ...
#define MADV_GUARD_REMOVE ...
"""


SANITIZERS = re.compile(r"[a-z][a-z-]*(,[a-z][a-z-]*)*")


def sanitizer_flags() -> list[str]:
    """The compile and link flags that $VRANGE_SANITIZE asks for (none when it is unset or empty)."""
    sanitizers = os.environ.get("VRANGE_SANITIZE", "").strip()
    if not sanitizers:
        return []
    if not SANITIZERS.fullmatch(sanitizers):
        raise RuntimeError(f"VRANGE_SANITIZE must be a comma-separated list of -fsanitize names "
                           f"(e.g. address,undefined), not {sanitizers!r}")
    # -O1 after the interpreter's -O3 (the last -O wins): readable stacks at a bearable speed.
    return [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-g", "-O1"]


def _relative(path: Path) -> str:
    # setuptools wants extension sources relative to the project root (the build's working directory).
    return os.path.relpath(path, Path.cwd())


ffibuilder = FFI()
for declarations in (exported_declarations(), CDEF_CALLBACK, CDEF_CONSTANTS):
    ffibuilder.cdef(declarations)

ffibuilder.set_source(
    "vrange._vrange_native",
    '#define _GNU_SOURCE\n#include "uffd_backend.h"\n#include "sigbus_backend.h"\n#include "pressure.h"\n#include "isolated.h"\n#include "gil_switching.h"\n',
    sources=[_relative(NATIVE_DIR / name) for name in C_SOURCES],
    include_dirs=[_relative(NATIVE_DIR)],
    depends=[_relative(path) for path in sorted(NATIVE_DIR.glob("*.h"))],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
                        *sanitizer_flags()],
    extra_link_args=sanitizer_flags(),
    libraries=["pthread"],
    # The fault signal handler calls PyGILState_Check, which is not in the limited API.
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
