"""A decompressed-chunk cache: a ``vrange.Region`` over a zlib-compressed file, decompressed on demand.

The file is stored as independently compressed 64 KiB chunks with an index of where each starts (a
seekable compressed format, as BGZF or zstd's seekable frames are). A :class:`vrange.Region` as
large as the decompressed data is its cache: the chunk an access touches is decompressed then, and
stays in memory; once the region is marked volatile the kernel (or vrange) may take any chunk back
under pressure, and the next access decompresses it again. The program reads the region as plain
memory (slices, ``find``, ``hashlib``) and never knows. The example reads it, purges it (and has
the kernel reclaim it, where it does for this backend), reads it again and checks every byte
against the original data; the exit status is 1 if one is wrong.

zlib releases the GIL while it decompresses large inputs, and a regenerator that lets the GIL go
while it serves the fault of a thread that holds the GIL is unsound (another thread may run in the
middle of the statement that faulted). So the regenerator runs in a helper process,
``vrange.sources.Isolated("zlib_chunks:decompress_chunks", ...)`` (docs/design.md, "Which
regenerators are sound where"); the helper imports this file as the module ``zlib_chunks``.

    python examples/zlib_chunks.py            # 32 MiB of records
    python examples/zlib_chunks.py --small    # 4 MiB
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import vrange
import vrange.testing

CHUNK = 64 << 10
"""Bytes of data per compressed piece, and the region's chunk size."""
WORDS = (b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"foxtrot", b"golf", b"hotel")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable as zlib_chunks (the helper)
TARGET = f"{Path(__file__).stem}:decompress_chunks"


def make_records(size: int) -> bytes:
    """``size`` bytes of text records, one per line: what the compressed file holds."""
    lines = []
    total = index = 0
    while total < size:
        line = b"%08d %s %d\n" % (index, WORDS[index * 7 % len(WORDS)], index * 2654435761 % 99991)
        lines.append(line)
        total += len(line)
        index += 1
    return b"".join(lines)[:size]


def compress_chunks(data: bytes, path: Path) -> list[tuple[int, int]]:
    """Write ``data`` to ``path`` as independently compressed CHUNK-byte pieces; the index: each
    piece's (offset, length) in the file."""
    index = []
    with open(path, "wb") as file:
        for start in range(0, len(data), CHUNK):
            piece = zlib.compress(data[start:start + CHUNK], 6)
            index.append((file.tell(), len(piece)))
            file.write(piece)
    return index


def decompress_chunks(offset: int, buf: memoryview, path: str, index: list[list[int]]) -> None:
    """The regenerator (run in the helper process): fill ``buf``, the region's bytes from
    ``offset``, by decompressing the pieces it covers (a region chunk may span several pieces where
    the backend chose larger chunks)."""
    with open(path, "rb") as file:
        position = 0
        for piece in range(offset // CHUNK, min(len(index), (offset + len(buf) + CHUNK - 1) // CHUNK)):
            start, length = index[piece]
            file.seek(start)
            data = zlib.decompress(file.read(length))
            buf[position:position + len(data)] = data
            position += len(data)


def check(region: vrange.Region, data: bytes, expected_digest: str, when: str) -> list[str]:
    """Read the whole region and some slices; what was wrong."""
    problems = []
    if hashlib.sha256(region).hexdigest() != expected_digest:  # C code, the GIL released
        problems.append(f"{when}: the SHA-256 of the whole region differs")
    for start in range(0, len(data), 7 * CHUNK + 4099):  # slices across chunk boundaries
        if region[start:start + 5000] != data[start:start + 5000]:
            problems.append(f"{when}: the 5000 bytes at offset {start} differ")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; 0 when every byte read was right, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="4 MiB of data, in a few seconds")
    args = parser.parse_args(argv)
    size = (4 if args.small else 32) << 20
    data = make_records(size)
    digest = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "records.zchunks"
        index = compress_chunks(data, path)
        print(f"{size >> 20} MiB of records in {len(index)} zlib pieces, {path.stat().st_size >> 10} "
              f"KiB compressed")
        source = vrange.sources.Isolated(TARGET, str(path), index)
        with vrange.Region(size, source, chunk_size=CHUNK) as region:
            started = time.perf_counter()
            problems = check(region, data, digest, "first read")
            stats = region.stats()
            print(f"first read: {stats.faults_served} chunks decompressed in the helper process "
                  f"({time.perf_counter() - started:.2f} s)")
            needle = b"%08d " % (size // 60)
            print(f"record {needle.decode().strip()} found at offset {region.find(needle)}")

            region.mark_volatile()  # from now on the kernel (or vrange) may take chunks back
            print(f"purge() gave back {region.purge() >> 10} KiB (as memory pressure would)")
            problems += check(region, data, digest, "after purge()")
            refilled = region.stats().faults_served - stats.faults_served
            print(f"read again: {refilled} chunks decompressed again, transparently")

            if region.kernel_reclaims:
                before = region.stats().faults_served
                vrange.testing.page_out(region)  # the kernel's own reclaim
                problems += check(region, data, digest, "after page_out()")
                print(f"after the kernel reclaimed the region (page_out): "
                      f"{region.stats().faults_served - before} chunks decompressed again")
            stats = region.stats()
            trap = f":{region.trap}" if region.trap else ""
            print(f"backend {region.backend}{trap}: {stats.faults_served} chunks served, "
                  f"{stats.bytes_regenerated >> 10} KiB decompressed, {stats.purges} purges")
    for problem in problems:
        print(f"WRONG: {problem}", file=sys.stderr)
    if not problems:
        print("every byte read was right")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
