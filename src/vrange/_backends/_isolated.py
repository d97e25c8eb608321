"""The native side of an isolated regenerator (``vrange.sources.Isolated``): the slots shared with
its helper process, and the sockets a fault uses to ask the helper for one chunk."""

from __future__ import annotations

from typing import Any

from .._native import ffi, lib
from ..errors import check

SLOTS = int(lib.VR_ISOLATED_SLOTS)
"""Faults one helper serves at once (one shared-memory slot and one socket each)."""
ERROR_TEXT_BYTES = 4096


class IsolatedChannel:
    """The native state shared by the regions of one ``Isolated`` source and its helper."""

    def __init__(self, memfd: int, slot_size: int, timeout_ms: int) -> None:
        out = ffi.new("vr_isolated **")
        check(lib.vr_isolated_new(memfd, slot_size, timeout_ms, out),
              "map the shared buffer of an Isolated regenerator")
        self.pointer: Any = out[0]

    def helper_dead(self) -> bool:
        """The native side saw the helper die or not answer in time."""
        return bool(lib.vr_isolated_dead(self.pointer))

    def last_error(self) -> str:
        """The traceback text of the helper's last failed regeneration."""
        text = ffi.new("char[]", ERROR_TEXT_BYTES)
        length = lib.vr_isolated_last_error(self.pointer, text, ERROR_TEXT_BYTES)
        return bytes(ffi.buffer(text, length)).decode(errors="replace")

    def helper_pid(self) -> int:
        """The pid of the helper the native side talks to (0: none)."""
        return int(lib.vr_isolated_helper_pid(self.pointer))

    def claim_all(self, timeout_ms: int) -> None:
        """Take every slot (faults in flight finish first), to replace the helper."""
        check(lib.vr_isolated_claim_all(self.pointer, timeout_ms),
              "take every slot of an Isolated regenerator to replace its helper")

    def release_all(self) -> None:
        lib.vr_isolated_release_all(self.pointer)

    def set_helper(self, pid: int, socket_fds: list[int]) -> None:
        """The new helper's pid and this side's sockets (one per slot; the channel owns them)."""
        lib.vr_isolated_set_helper(self.pointer, pid, ffi.new("int[]", socket_fds))

    def forget_helper(self) -> None:
        """In a forked child: the helper and its sockets are the parent's."""
        lib.vr_isolated_forget_helper(self.pointer)

    def remap(self, memfd: int) -> None:
        check(lib.vr_isolated_remap(self.pointer, memfd), "map the child's shared buffer")

    def free(self) -> None:
        """Close the sockets (the helper sees EOF and exits) and unmap the slots."""
        if self.pointer != ffi.NULL:
            lib.vr_isolated_free(self.pointer)
            self.pointer = ffi.NULL
