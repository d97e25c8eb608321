"""A decoded-tile cache that gives its memory back under pressure: Pillow tiles in a ``vrange.Cache``.

A map is kept as a tile server keeps it: cut into tiles, each stored compressed on disk (here PNG and
JPEG tiles written with Pillow into a temporary directory). Decoding a tile is the expensive part, so
the decoded RGB pixels are cached in a :class:`vrange.Cache`, and each request is answered straight
from the cache's memory: ``cache.borrow(tile)`` lends a read-only view of the pixels, pinned for the
block, which is written to a socket without a copy. Between requests the tiles are volatile: the
kernel (or vrange's pressure policy) may take any of them back, and the next request decodes it
again. The example then does what memory pressure would: ``cache.purge()``, and, where the kernel
reclaims this backend's memory, ``vrange.testing.page_out`` (the kernel's own reclaim), and serves
the hot tiles again. Every tile received is checked against its CRC-32; the exit status is 1 if one
is wrong.

Pillow decodes in ``load``, which the cache calls from a library call (the miss, or the pin that found
the tile purged), never inside a page fault: it may release the GIL freely (docs/design.md, "Which
regenerators are sound where"). The cache's region is filled by the native ``Zeros`` source.

    pip install Pillow
    python examples/tile_cache.py            # a 2048x2048 map in 64 tiles, 2000 requests
    python examples/tile_cache.py --small    # a 1024x1024 map in 16 tiles, 300 requests
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

import vrange
import vrange.testing

TILE = 256  # pixels: 256 * 256 * 3 = 192 KiB decoded, three 64 KiB chunks
Key = tuple[int, int]


def make_map(size: int) -> Image.Image:
    """A synthetic map: gradients, noise and some shapes, so that tiles differ and compress."""
    red = Image.linear_gradient("L").resize((size, size))
    green = Image.radial_gradient("L").resize((size, size))
    blue = Image.effect_noise((size, size), 48)
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    generator = random.Random(7)
    for _ in range(size // 16):
        x, y = generator.randrange(size), generator.randrange(size)
        radius = generator.randrange(8, 64)
        colour = tuple(generator.randrange(256) for _ in range(3))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=3)
    return image


def write_tiles(image: Image.Image, directory: Path) -> dict[Key, tuple[Path, int]]:
    """Cut ``image`` into tiles, PNG and JPEG alternately; each tile's path and the CRC-32 of its
    decoded pixels."""
    tiles: dict[Key, tuple[Path, int]] = {}
    for x in range(image.width // TILE):
        for y in range(image.height // TILE):
            tile = image.crop((x * TILE, y * TILE, (x + 1) * TILE, (y + 1) * TILE))
            if (x + y) % 2:
                path = directory / f"{x}-{y}.jpg"
                tile.save(path, quality=85)
                with Image.open(path) as decoded:  # lossy: the reference is the decoded JPEG
                    pixels = decoded.convert("RGB").tobytes()
            else:
                path = directory / f"{x}-{y}.png"
                tile.save(path)
                pixels = tile.tobytes()
            tiles[(x, y)] = (path, zlib.crc32(pixels))
    return tiles


def serve(cache: vrange.Cache[Key], requests: list[Key], connection: socket.socket) -> None:
    """Answer each request with the decoded tile, sent from the cache's memory (no copy)."""
    for key in requests:
        with cache.borrow(key) as pixels:
            connection.sendall(pixels)
    connection.shutdown(socket.SHUT_WR)


def fetch(cache: vrange.Cache[Key], requests: list[Key],
          tiles: dict[Key, tuple[Path, int]]) -> int:
    """Request ``requests`` from a server thread over a socket pair; the wrong tiles received."""
    server, client = socket.socketpair()
    sender = threading.Thread(target=serve, args=(cache, requests, server))
    sender.start()
    received = bytearray()
    while chunk := client.recv(1 << 20):
        received += chunk
    sender.join()
    server.close()
    client.close()
    size = TILE * TILE * 3
    wrong = sum(zlib.crc32(received[index * size:(index + 1) * size]) != tiles[key][1]
                for index, key in enumerate(requests))
    if len(received) != len(requests) * size:
        wrong += 1
    return wrong


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; 0 when every tile received was right, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small map, in a few seconds")
    args = parser.parse_args(argv)
    size, count = (1024, 300) if args.small else (2048, 2000)
    with tempfile.TemporaryDirectory() as temporary:
        tiles = write_tiles(make_map(size), Path(temporary))
        print(f"{len(tiles)} tiles of {TILE}x{TILE} (PNG and JPEG) written by Pillow")

        def decode(key: Key) -> bytes:  # a miss, or a tile taken back
            with Image.open(tiles[key][0]) as image:
                return image.convert("RGB").tobytes()

        keys = sorted(tiles)
        hot = keys[:len(keys) // 8]
        generator = random.Random(2014)
        requests = [generator.choice(hot) if generator.random() < 0.8 else generator.choice(keys)
                    for _ in range(count)]
        # Room for half the tiles: beyond that the least recently used are evicted.
        with vrange.Cache(len(keys) // 2 * TILE * TILE * 3, decode) as cache:
            wrong = fetch(cache, requests, tiles)
            stats = cache.stats()
            print(f"{count} requests served: {stats.hits} hits, {stats.misses} decodes, "
                  f"{stats.evictions} evictions, {stats.resident_bytes >> 10} KiB resident")

            print(f"purge() gave back {cache.purge() >> 10} KiB (as memory pressure would)")
            wrong += fetch(cache, hot, tiles)
            reloads = cache.stats().reloads
            print(f"the {len(hot)} hot tiles served again: {reloads} reloaded (decoded again)")

            region = cache.region
            if region.kernel_reclaims:
                vrange.testing.page_out(region)  # the kernel's own reclaim
                wrong += fetch(cache, hot, tiles)
                print(f"after the kernel reclaimed the cache (page_out): "
                      f"{cache.stats().reloads - reloads} tiles reloaded")
            else:
                print(f"the {region.backend} backend's {region.trap} trap: the kernel never "
                      "reclaims it, only vrange (purge, the pressure policy)")
            stats = cache.stats()
            print(f"backend {region.backend}: {stats.hits} hits, {stats.misses} misses, "
                  f"{stats.reloads} reloads, {stats.evictions} evictions")
    if wrong:
        print(f"WRONG: {wrong} tile(s) received with the wrong bytes", file=sys.stderr)
        return 1
    print("every tile received was right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
