"""A volatile cache larger than its memory cgroup allows, read in passes (run by test_memory_pressure).

    python memory_pressure_child.py --cgroup-procs FILE [--uid N] --backend SPEC --mode once|remark
        --size BYTES --passes N

Joins the cgroup (writes its pid to FILE), drops to ``--uid`` if given, then fills and reads a
``--size`` region on backend ``--backend``, checking every byte. ``once``: the whole cache is marked
volatile once, before its first access, and then only read. ``remark``: each part is pinned, read and
marked volatile again. Prints one JSON object; exits 1 on a wrong byte. An OOM kill shows as SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from array import array

# Everything is imported while this process can still read every file: an interpreter installed
# under a private home directory cannot load modules once the process runs as another user.
import vrange
import vrange._backends.sigbus  # noqa: F401
import vrange._backends.uffd  # noqa: F401
import vrange.policy
import vrange.testing

CHUNK = vrange.DEFAULT_CHUNK_SIZE
PART = 16 * CHUNK


def content(offset: int, length: int) -> bytes:
    """Every 8-byte word holds its own index in the region: a misplaced page cannot pass."""
    return array("Q", range(offset // 8, (offset + length) // 8)).tobytes()


def regenerate(offset: int, buffer: memoryview) -> None:
    buffer[:] = content(offset, len(buffer))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cgroup-procs", required=True)
    parser.add_argument("--uid", type=int)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--mode", choices=("once", "remark"), required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--deny-userfaultfd", action="store_true",
                        help="a container's default seccomp profile: no userfaultfd at all")
    args = parser.parse_args()

    with open(args.cgroup_procs, "w") as procs:
        procs.write(str(os.getpid()))
    if args.deny_userfaultfd:
        vrange.testing.deny_userfaultfd()
    if args.uid is not None:
        os.setgroups([])
        os.setgid(args.uid)
        os.setuid(args.uid)

    started = time.monotonic()
    wrong = []
    with vrange.Region(args.size, regenerate, backend=args.backend) as cache:
        if args.mode == "once":
            cache.mark_volatile()
        for _ in range(args.passes):
            for offset in range(0, args.size, PART):
                if args.mode == "remark":
                    cache.mark_nonvolatile(offset, PART)
                if cache[offset:offset + PART] != content(offset, PART):
                    wrong.append(offset)
                if args.mode == "remark":
                    cache.mark_volatile(offset, PART)
        stats = cache.stats()
        policy = vrange.policy.stats()
        result = {"backend": cache.backend, "trap": cache.trap, "uid": os.geteuid(),
                  "managed": cache.managed, "purges_by_reason": stats.purges_by_reason,
                  "policy_signal": policy.signal, "policy_reason": policy.reason,
                  "policy_purges": policy.purges_by_reason, "peak_usage": policy.peak_usage_bytes,
                  "throttled_faults": policy.throttled_faults, "pokes": policy.pokes,
                  "signal_events": policy.signal_events,
                  "auto_reason": vrange.features().auto_reason, "wrong_parts": wrong[:10],
                  "purges": stats.purges, "faults_served": stats.faults_served,
                  "volatile_refills": stats.volatile_refills,
                  "bytes_regenerated": stats.bytes_regenerated,
                  "seconds": round(time.monotonic() - started, 2)}
    print(json.dumps(result), flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
