"""A decoded-image cache that gives its memory back under pressure: ``vrange.Cache``.

Compressed images live on disk (here: generated into a temporary directory). Decoding one is the
expensive part, so the decoded pixels are cached, and a request is answered straight from the
cache's memory: ``cache.borrow(name)`` lends a read-only view of the decoded bytes, pinned for the
block, which is written to a socket without a copy. Between requests the images are volatile: the
kernel (or vrange's pressure policy) may take any of them back, and the next request decodes it
again. ``cache.purge()`` below does what memory pressure would.

    python examples/image_cache.py
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import threading
import zlib
from pathlib import Path

import vrange

WIDTH, HEIGHT = 512, 256  # 8-bit grey: 128 KiB decoded per image


def make_images(directory: Path, count: int) -> list[str]:
    """Write ``count`` compressed images (a gradient with a per-image pattern)."""
    names = []
    for index in range(count):
        rows = bytes((x * (index + 1) + y * 3) % 256 for y in range(HEIGHT) for x in range(WIDTH))
        name = f"image-{index:03}.z"
        (directory / name).write_bytes(zlib.compress(rows, 6))
        names.append(name)
    return names


def serve(cache: vrange.Cache[str], requests: list[str], connection: socket.socket) -> None:
    """Answer each request with the decoded image, sent from the cache's memory (no copy)."""
    for name in requests:
        with cache.borrow(name) as pixels:
            connection.sendall(pixels)
    connection.shutdown(socket.SHUT_WR)


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        names = make_images(directory, 48)

        def decode(name: str) -> bytes:  # a miss, or an image the kernel took back
            return zlib.decompress((directory / name).read_bytes())

        # Room for 32 decoded images (4 MiB): beyond that the least recently used are evicted.
        # chunk_size: each image occupies whole chunks, so match it to the image size.
        with vrange.Cache(32 * WIDTH * HEIGHT, decode, chunk_size=WIDTH * HEIGHT) as cache:
            generator = random.Random(7)
            hot = names[:8]
            requests = [generator.choice(hot) if generator.random() < 0.8
                        else generator.choice(names) for _ in range(400)]
            server, client = socket.socketpair()
            sender = threading.Thread(target=serve, args=(cache, requests, server))
            sender.start()
            received = bytearray()
            while chunk := client.recv(1 << 20):
                received += chunk
            sender.join()
            server.close()
            client.close()
            assert len(received) == len(requests) * WIDTH * HEIGHT
            for index, name in enumerate(requests[:20]):
                start = index * WIDTH * HEIGHT
                assert received[start:start + WIDTH * HEIGHT] == decode(name)
            print("after 400 requests:", cache.stats())

            print(f"purge() gave back {cache.purge() >> 10} KiB (as memory pressure would)")
            for name in hot:
                assert cache[name] == decode(name)  # decoded again, transparently
            stats = cache.stats()
            print("after re-reading the hot images:", stats)
            assert stats.reloads == len(hot)
            print(f"backend {cache.region.backend}, pid {os.getpid()}: "
                  f"{stats.hits} hits, {stats.misses} misses, {stats.reloads} reloads, "
                  f"{stats.evictions} evictions, {stats.resident_bytes >> 10} KiB resident")


if __name__ == "__main__":
    main()
