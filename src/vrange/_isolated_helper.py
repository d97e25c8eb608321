"""The helper process of :class:`vrange.sources.Isolated` (``python -m vrange._isolated_helper``).

It imports the regenerator, then serves requests until every socket is closed: for each request
``(offset, length)`` on a slot's socket it calls ``function(offset, buffer, *args)`` with ``buffer`` a
writable memoryview of that slot's part of the shared memfd, and answers ``(0, "")`` or ``(1,
traceback)``. Ctrl-C is ignored here (it reaches the whole process group): the parent decides.
"""

from __future__ import annotations

import base64
import importlib
import json
import mmap
import pickle
import selectors
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable

REQUEST = struct.Struct("QQ")
REPLY = struct.Struct("iI")
ERROR_BYTES = 4096


def resolve(target: str) -> Callable[..., object]:
    """``"package.module:function"`` (or ``module:Class.method``) -> the callable."""
    module_name, _, qualified_name = target.partition(":")
    value: object = importlib.import_module(module_name)
    for part in qualified_name.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target} is not callable")
    return value


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    sys.path[:0] = [entry for entry in config["path"] if entry not in sys.path]
    function = resolve(config["target"])
    arguments = pickle.loads(base64.b64decode(config["arguments"]))
    slot_size = config["slot_size"]
    shared = mmap.mmap(config["memfd"], slot_size * len(config["fds"]))
    view = memoryview(shared)
    selector = selectors.DefaultSelector()
    for slot, fd in enumerate(config["fds"]):
        selector.register(socket.socket(fileno=fd), selectors.EVENT_READ, slot)
    while selector.get_map():
        for key, _ in selector.select():
            connection = key.fileobj
            assert isinstance(connection, socket.socket)
            try:
                request = connection.recv(REQUEST.size)
            except OSError:
                request = b""
            if len(request) != REQUEST.size:  # the parent closed this slot (or is gone)
                selector.unregister(connection)
                connection.close()
                continue
            offset, length = REQUEST.unpack(request)
            start = key.data * slot_size
            buffer = view[start:start + length]
            try:
                function(offset, buffer, *arguments)
                answer = REPLY.pack(0, 0)
            except BaseException:  # noqa: BLE001 - the parent reports it by its policy
                text = traceback.format_exc().encode(errors="replace")[-ERROR_BYTES:]
                answer = REPLY.pack(1, len(text)) + text
            finally:
                buffer.release()
            try:
                connection.send(answer)
            except OSError:
                selector.unregister(connection)
                connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
