"""cffi build script for the vrange native core (out-of-line API mode).

Run by setuptools through ``cffi_modules`` in setup.py; never at import time. The C lives in real
``.c`` files beside this script, one per concern; the declarations cffi exposes to Python are kept
here per topic, mirroring common.h.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

NATIVE_DIR = Path(__file__).resolve().parent
C_SOURCES = ["uffd_fd.c", "probe.c", "seccomp.c"]

CDEF_COMMON = """
int vr_native_version(void);
long vr_page_size(void);
int vr_close(int fd);
"""

CDEF_UFFD = """
int vr_uffd_open_syscall(int flags, int *fd_out);
int vr_uffd_open_dev(int flags, int *fd_out);
int vr_uffd_api(int fd, uint64_t requested_features, uint64_t *features_out, uint64_t *ioctls_out);
"""

CDEF_PROBE = """
int vr_probe_madvise(int advice);
int vr_probe_memfd(void);
int vr_probe_uffd_kernel_fault(int uffd, int timeout_ms, uint64_t *range_ioctls_out,
                               int *serves_syscalls_out);
"""

CDEF_SECCOMP = """
int vr_seccomp_deny_userfaultfd(int error_number, int also_dev_ioctl);
"""

# Constants whose values Python needs; cffi reads them from the headers at build time.
CDEF_CONSTANTS = """
#define VR_NATIVE_VERSION ...
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


def _relative(path: Path) -> str:
    # setuptools wants extension sources relative to the project root (the build's working directory).
    return os.path.relpath(path, Path.cwd())


ffibuilder = FFI()
for declarations in (CDEF_COMMON, CDEF_UFFD, CDEF_PROBE, CDEF_SECCOMP, CDEF_CONSTANTS):
    ffibuilder.cdef(declarations)

ffibuilder.set_source(
    "vrange._vrange_native",
    '#define _GNU_SOURCE\n#include "common.h"\n',
    sources=[_relative(NATIVE_DIR / name) for name in C_SOURCES],
    include_dirs=[_relative(NATIVE_DIR)],
    depends=[_relative(path) for path in sorted(NATIVE_DIR.glob("*.h"))],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
