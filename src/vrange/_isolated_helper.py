"""The helper process of :class:`vrange.sources.Isolated` (``python -m vrange._isolated_helper``).

It imports the regenerator, then serves requests until every socket is closed: for each request
``(offset, length)`` on a slot's socket it calls ``function(offset, buffer, *args)`` with ``buffer`` a
writable memoryview of that slot's part of the shared memfd, and answers ``(0, "")`` or ``(1,
traceback)``. Ctrl-C is ignored here (it reaches the whole process group): the parent decides.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import json
import mmap
import pickle
import signal
import socket
import struct
import sys
import threading
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


def serve(connection: socket.socket, view: memoryview, function: Callable[..., object],
          arguments: tuple[object, ...]) -> None:
    """One slot: answer its requests until the parent closes its socket."""
    with connection:
        while True:
            try:
                request = connection.recv(REQUEST.size)
            except OSError:
                return
            if len(request) != REQUEST.size:  # the parent closed this slot (or is gone)
                return
            offset, length = REQUEST.unpack(request)
            buffer = view[:length]
            try:
                result = function(offset, buffer, *arguments)
                if inspect.isawaitable(result):  # never awaited: it filled nothing
                    close = getattr(result, "close", None)
                    if callable(close):
                        close()
                    raise TypeError("the regenerator returned an awaitable: it must fill the "
                                    "buffer synchronously")
                if inspect.isgenerator(result):  # its body, which would fill, never runs
                    result.close()
                    raise TypeError("the regenerator returned a generator: it must fill the "
                                    "buffer when called")
                answer = REPLY.pack(0, 0)
            except BaseException:  # noqa: BLE001 - the parent reports it by its policy
                text = traceback.format_exc().encode(errors="replace")[-ERROR_BYTES:]
                answer = REPLY.pack(1, len(text)) + text
            finally:
                buffer.release()
            try:
                connection.send(answer)
            except OSError:
                return


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    sys.path[:0] = [entry for entry in config["path"] if entry not in sys.path]
    function = resolve(config["target"])
    arguments = pickle.loads(base64.b64decode(config["arguments"]))
    slot_size = config["slot_size"]
    shared = mmap.mmap(config["memfd"], slot_size * len(config["fds"]))
    view = memoryview(shared)
    # One thread per slot: requests are served at once, each within its own timeout (a regenerator
    # that waits on I/O or sleeps lets the others run).
    threads = [threading.Thread(target=serve, args=(socket.socket(fileno=fd),
                                                    view[slot * slot_size:(slot + 1) * slot_size],
                                                    function, arguments), daemon=True)
               for slot, fd in enumerate(config["fds"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
