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
C_SOURCES = [
    "uffd_fd.c",
    "probe.c",
    "seccomp.c",
    "uffd_handler.c",
    "region.c",
    "uffd_region.c",
    "fault_signal.c",
    "sigbus.c",
    "bench.c",
]

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

CDEF_BENCH = """
int vr_touch_pages(uintptr_t address, size_t length, size_t stride, int write, uint64_t *ns_out);
"""

CDEF_SECCOMP = """
int vr_seccomp_deny_userfaultfd(int error_number, int also_dev_ioctl);
"""

CDEF_REGIONS = """
typedef struct vr_handler vr_handler;
typedef struct vr_region vr_region;
struct vr_stats {
    uint64_t faults_on_handler_thread;
    uint64_t faults_on_faulting_thread;
    uint64_t faults_on_worker_thread;
    uint64_t bytes_regenerated;
    uint64_t regeneration_errors;
    uint64_t purges;
};
#define VR_SOURCE_ZEROS ...
#define VR_SOURCE_FILE ...
#define VR_SOURCE_PYTHON ...
#define VR_ON_ERROR_POISON ...
#define VR_ON_ERROR_ZEROS ...
#define VR_ON_ERROR_ABORT ...
#define VR_CHUNK_VOLATILE ...
#define VR_CHUNK_MATERIALIZED ...
#define VR_CHUNK_PURGED ...
#define VR_CHUNK_POISONED ...
#define VR_CHUNK_IN_FLIGHT ...
#define VR_CHUNK_TRAPPED ...

extern "Python+C" int vr_python_regenerate(void *python_handle, uint64_t offset, char *buf,
                                           size_t len);

int vr_handler_new(int signal_number, vr_handler **out);
int vr_handler_start(vr_handler *handler);
void vr_handler_free(vr_handler *handler);
int vr_handler_signal_is_ours(vr_handler *handler);
int vr_fault_signal_install(int signal_number, int force);
int vr_region_quiesce(vr_region *region, int timeout_ms);
int vr_region_last_native_error(vr_region *region);

int vr_region_new(vr_handler *handler, uintptr_t base, size_t size, size_t chunk_size,
                  int source_kind, int file_fd, int64_t file_offset, void *python_handle,
                  int on_error, vr_region **out);
int vr_region_register(vr_region *region);
int vr_region_close(vr_region *region);
int vr_region_resume(vr_region *region);
int vr_region_references(vr_region *region);
void vr_region_release(vr_region *region);
int vr_region_mark_volatile(vr_region *region, size_t first_chunk, size_t end_chunk);
void vr_region_set_volatile(vr_region *region, size_t first_chunk, size_t end_chunk);
int64_t vr_region_purge(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_discard(vr_region *region, size_t first_chunk, size_t end_chunk, int only_poisoned);
int vr_region_populate(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_prefault(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_region_finish_nonvolatile(vr_region *region, size_t first_chunk, size_t end_chunk,
                                 uint8_t *purged_out);
int vr_region_chunk_states(vr_region *region, uint8_t *states_out);
int vr_region_residency(vr_region *region, uint8_t *pages_out);
void vr_region_stats(vr_region *region, struct vr_stats *out);
int vr_region_rebind_after_fork(vr_region *region, vr_handler *handler);
int vr_pageout(uintptr_t address, size_t length);

int vr_sigbus_install(void);
int vr_sigbus_handler_is_ours(void);
void vr_sigbus_python_finalized(void);
int vr_sigbus_attach(vr_region *region);
int vr_sigbus_detach(vr_region *region);
void vr_sigbus_resume(vr_region *region);
int64_t vr_sigbus_purge(vr_region *region, size_t first_chunk, size_t end_chunk);
int vr_sigbus_discard(vr_region *region, size_t first_chunk, size_t end_chunk, int only_poisoned);
int vr_sigbus_populate(vr_region *region, size_t first_chunk, size_t end_chunk);
void vr_sigbus_after_fork(vr_region *region);
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
for declarations in (CDEF_COMMON, CDEF_UFFD, CDEF_PROBE, CDEF_SECCOMP, CDEF_BENCH, CDEF_REGIONS,
                     CDEF_CONSTANTS):
    ffibuilder.cdef(declarations)

ffibuilder.set_source(
    "vrange._vrange_native",
    '#define _GNU_SOURCE\n#include "uffd_backend.h"\n',
    sources=[_relative(NATIVE_DIR / name) for name in C_SOURCES],
    include_dirs=[_relative(NATIVE_DIR)],
    depends=[_relative(path) for path in sorted(NATIVE_DIR.glob("*.h"))],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["pthread"],
    # The fault signal handler calls PyGILState_Check, which is not in the limited API.
    py_limited_api=False,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
