"""Running a Python regenerator for native code: the one C -> Python callback, and what it needs.

Native code calls :func:`vr_python_regenerate` (a cffi ``extern "Python+C"`` callback) through
``vr_run_python_regenerator`` (``_native/python_regenerator.c``), with the GIL (cffi takes it when the
calling thread does not hold it), on a uffd worker, in the fault signal handler of a thread that
faulted while holding the GIL, or in the SIGBUS handler of the faulting thread.

- **Interrupts are not failures.** A ``KeyboardInterrupt``, ``SystemExit`` or other exception that is
  not an ``Exception`` (Ctrl-C, a signal handler raising ``SystemExit``) that escapes the regenerator
  makes it run again, so the faulting access completes with the right bytes; the interrupt is then
  raised again at the program's next safe point, on the main thread, as Ctrl-C normally is.
- **The buffer is the regenerator's only while it runs.** ``buf`` is a memoryview of memory vrange
  owns (a scratch buffer from a small pool, copied to the chunk once the regenerator returns) and is
  released when it returns: using it afterwards raises ``ValueError``. A view the regenerator kept of
  it (a slice, a numpy array, ``buf.obj``) keeps that scratch buffer alive and stays harmless: vrange
  never hands it out again, so nothing it writes later reaches a region or another allocation.
- **Unsafe points.** A thread that faulted while holding the GIL is in the middle of a C operation
  that assumes no other Python thread runs until it completes. While its regenerator runs, vrange
  holds off forced GIL switches (``_native/gil_switching.c``: under the GIL's own mutex, so that a
  switch already requested is withdrawn too; CPython 3.11). A regenerator that lets the GIL go itself
  (I/O, ``time.sleep``, a C call that releases it) lets other threads run all the same, and vrange
  warns once when another Python thread ran: such a regenerator belongs in a helper process,
  :class:`vrange.sources.Isolated`, where the faulting thread keeps the GIL and waits.
"""

from __future__ import annotations

import collections
import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .._native import ffi

logger = logging.getLogger("vrange")

# Return codes understood by python_regenerator.c. RETRY: an interrupt hit vrange's own code around
# the regenerator (not the regenerator itself); C calls again and delivers the interrupt afterwards.
OK, FAILED, OK_INTERRUPTED, FAILED_INTERRUPTED, RETRY = 0, -1, 1, 2, 3
# Flags passed by python_regenerator.c.
AT_UNSAFE_POINT, OUTERMOST, AHEAD = 1, 2, 4
ATTEMPTS_WHEN_INTERRUPTED = 3
MAX_KEPT_FAILURES = 64
OTHER_THREAD_RAN_NS = 500_000  # CPU time another thread used meanwhile that means it ran


MAX_SPARE_BUFFERS = 8
# Scratch buffers no view refers to any more, ready to be handed out again. One list for every
# thread: it is only touched with the GIL held (pop and append are atomic then), and a uffd worker's
# thread state (and any thread-local) ends with each callback. A buffer taken is its taker's alone
# (a nested regeneration takes another) until it is given back.
_spare_scratch: list[Any] = []
_zeros: Any = ffi.new("char[]", 1)


def _zero(buffer: Any, length: int) -> None:
    global _zeros
    if ffi.sizeof(_zeros) < length:
        _zeros = ffi.new("char[]", length)
    ffi.memmove(buffer, _zeros, length)


def _take_scratch(length: int) -> Any:
    """A zeroed scratch buffer of at least ``length`` bytes (a cffi ``char[]``)."""
    while True:
        try:
            buffer = _spare_scratch.pop()
        except IndexError:  # none (another thread may have taken the last one meanwhile)
            break
        if ffi.sizeof(buffer) >= length:
            _zero(buffer, length)
            return buffer
    return ffi.new("char[]", length)  # zeroed


def _give_back_scratch(buffer: Any) -> None:
    if len(_spare_scratch) < MAX_SPARE_BUFFERS:
        _spare_scratch.append(buffer)


class Regeneration:
    """What native code calls back for one region, and all it may touch: the regenerator, and the
    record of its failures (``vrange.Region`` reads them). Held by the region's native state through
    a cffi handle; it refers to no region, so nothing the callback does can reach the public object
    (whose lock the faulting call may hold)."""

    __slots__ = ("regenerate", "on_error", "retired", "failure_count", "_failures", "__weakref__")

    def __init__(self, regenerate: Callable[[int, memoryview], object], on_error: str) -> None:
        self.regenerate = regenerate
        self.on_error = on_error
        self.retired = False
        """Set once the region is closed: a late callback fails instead of running."""
        self.failure_count = 0
        self._failures: collections.deque[tuple[int, int, BaseException, bool]] = \
            collections.deque(maxlen=MAX_KEPT_FAILURES)

    def retire(self) -> None:
        """The region is closed: a late callback fails instead of running, and the regenerator is let
        go now (a closed region's native state may outlive it for a while, and the regenerator may
        own a helper process or a file: they must end with the region, not with that state)."""
        self.retired = True
        self.regenerate = _closed_regenerator

    def record_failure(self, offset: int, error: BaseException, ahead: bool = False) -> None:
        """``ahead``: a chunk filled ahead of a fault (fill-ahead) failed; no access did (the walk's
        own fault regenerates it, and only that applies the policy), so no call is failed for it."""
        self.failure_count += 1
        self._failures.append((self.failure_count, offset, error, ahead))
        logger.warning("regenerator failed at offset %d: %r (policy: %s)",
                       offset, error, self.on_error)

    def failures_since(self, count: int) -> list[tuple[int, BaseException]]:
        """``(offset, exception)`` of the failures recorded after the ``count``-th, oldest first
        (not those of chunks filled ahead of a fault: they failed no access)."""
        return [(offset, error) for sequence, offset, error, ahead in list(self._failures)
                if sequence > count and not ahead]

    def recent_failures(self) -> list[tuple[int, BaseException]]:
        return [(offset, error) for _, offset, error, _ in list(self._failures)]


def _closed_regenerator(offset: int, buffer: memoryview) -> None:
    raise RuntimeError("the region is closed")


class _Regenerating(threading.local):
    """Per thread: the regenerations running now, innermost last."""

    def __init__(self) -> None:
        self.entries: list[Regeneration] = []


_regenerating = _Regenerating()


def is_regenerating(regeneration: Regeneration) -> bool:
    """Whether this thread is inside ``regeneration``'s regenerator (the region's methods must not
    be called from there: the call that faulted may hold the region's lock)."""
    return any(entry is regeneration for entry in _regenerating.entries)


def any_regenerating_on_this_thread() -> bool:
    """Whether this thread is inside any region's regenerator (a test harness must not purge from
    there: the thread may be serving a fault in the middle of another region's operation)."""
    return bool(_regenerating.entries)


_deferred_interrupts: collections.deque[BaseException] = collections.deque()
_unsafe_lock = threading.Lock()
_warned_about_other_threads = False


def _cpu_times_of_other_threads() -> dict[int, int]:
    if threading.active_count() == 1:
        return {}  # no other Python thread (the common case: nothing to enumerate)
    times = {}
    current = threading.get_ident()
    for thread in threading.enumerate():
        if thread.ident is None or thread.ident == current:
            continue
        try:
            times[thread.ident] = time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ValueError, OverflowError):
            continue  # it has just ended
    return times


def _warn_if_other_threads_ran(before: dict[int, int]) -> None:
    """Tell (once) when another Python thread ran while the regenerator ran at an unsafe point
    (``before``: :func:`_cpu_times_of_other_threads` when it started). A plain function rather than
    a context manager: it runs at every fault, and a generator-based one costs a microsecond."""
    global _warned_about_other_threads
    if before:
        after = _cpu_times_of_other_threads()
        ran = any(after.get(ident, used) - used > OTHER_THREAD_RAN_NS
                  for ident, used in before.items())
        if ran:
            with _unsafe_lock:
                first = not _warned_about_other_threads
                _warned_about_other_threads = True
            if first:
                logger.warning(
                    "another Python thread ran while a regenerator ran inside a faulting "
                    "operation of a thread holding the GIL; that thread may have changed the "
                    "objects the interrupted operation is using. Run such a regenerator in a "
                    "helper process with vrange.sources.Isolated (docs/design.md, 'Which "
                    "regenerators are sound where')")


def _keep_as_text(error: BaseException) -> None:
    """Keep the traceback as text: its frames would keep their callers alive, and with them any
    memoryview of a region (which could then never be closed)."""
    error.vrange_traceback = "".join(  # type: ignore[attr-defined]
        traceback.format_exception(type(error), error, error.__traceback__))
    error.__context__ = None  # whatever the faulting thread was handling
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:  # `raise ... from cause`: its frames too
        seen.add(id(link))
        link.__traceback__ = None
        link.__context__ = None
        link = link.__cause__


def run(regeneration: Regeneration, offset: int, buffer: Any, length: int, flags: int) -> int:
    """Fill ``buffer`` for the chunk at ``offset``; one of the return codes above. Raises only an
    interrupt (KeyboardInterrupt...) that hit this code rather than the regenerator: the callback's
    ``onerror`` then asks native code to call again (RETRY)."""
    at_unsafe_point = bool(flags & AT_UNSAFE_POINT)
    entries = _regenerating.entries
    if flags & OUTERMOST:
        entries.clear()  # entries an earlier interrupt left behind: no regenerator runs below
    entries.append(regeneration)
    try:
        return _run(regeneration, offset, buffer, length, at_unsafe_point, bool(flags & AHEAD))
    finally:
        entries.pop()


def _run(regeneration: Regeneration, offset: int, buffer: Any, length: int,
         at_unsafe_point: bool, ahead: bool = False) -> int:
    scratch = _take_scratch(length)
    exported = ffi.buffer(scratch, length)
    view = memoryview(exported)
    interrupt: BaseException | None = None
    failed = True
    try:
        other_threads = _cpu_times_of_other_threads() if at_unsafe_point else None
        try:
            regenerate = regeneration.regenerate
            for attempt in range(ATTEMPTS_WHEN_INTERRUPTED):
                if attempt:  # the interrupted attempt's bytes must not stay behind
                    _zero(scratch, length)
                try:
                    result = regenerate(offset, view)
                    if inspect.isawaitable(result):
                        # An async regenerator that slipped past the check at construction (a
                        # plain function returning a coroutine): it filled nothing. Never hand
                        # out the zeros: fail by the region's policy.
                        close = getattr(result, "close", None)
                        if callable(close):
                            close()  # no "coroutine was never awaited" warning
                        raise TypeError(
                            f"the regenerator returned an awaitable ({type(result).__name__}): "
                            "regenerators must fill buf synchronously (an async regenerator is "
                            "never awaited)")
                    if inspect.isgenerator(result):
                        # A generator function that slipped past the check at construction (a
                        # plain function returning one): its body, which would fill buf, never
                        # runs. Never hand out the zeros.
                        result.close()
                        raise TypeError(
                            "the regenerator returned a generator: regenerators must fill buf "
                            "when called (a generator's body runs only when it is iterated)")
                except Exception as error:  # noqa: BLE001 - recorded, reported by policy
                    _keep_as_text(error)
                    regeneration.record_failure(offset, error, ahead)
                    break
                except BaseException as error:  # noqa: BLE001 - delivered later, not a failure
                    if interrupt is None:
                        interrupt = error
                        error.__traceback__ = None
                        error.__context__ = None
                        _deferred_interrupts.append(error)  # now: another may escape below
                    continue
                failed = False
                break
            else:
                assert interrupt is not None
                stuck = RuntimeError(f"the regenerator was interrupted {ATTEMPTS_WHEN_INTERRUPTED} "
                                     f"times in a row ({interrupt!r})")
                _keep_as_text(stuck)
                regeneration.record_failure(offset, stuck, ahead)
        finally:
            if other_threads:
                _warn_if_other_threads_ran(other_threads)
    except Exception as error:  # noqa: BLE001 - cffi would only print it
        _keep_as_text(error)
        regeneration.record_failure(offset, error, ahead)
        failed = True
    # An interrupt that hits this code itself (not the regenerator) escapes: the callback's onerror
    # keeps it and native code calls again.
    finally:
        try:
            view.release()
        except BufferError:  # the regenerator kept an export of it (a numpy array, say)
            pass
    if not failed:
        ffi.memmove(buffer, scratch, length)
    # Only `exported` and getrefcount's argument refer to it unless a view of it survives (a slice,
    # an array, buf.obj): then the scratch buffer is left to the survivors, never reused.
    if sys.getrefcount(exported) == 2:
        _give_back_scratch(scratch)
    del exported, view
    if interrupt is not None:
        return FAILED_INTERRUPTED if failed else OK_INTERRUPTED
    return FAILED if failed else OK


def raise_deferred_interrupt() -> None:
    """Called by a pending call at the main thread's next safe point: raise the interrupt that
    arrived while a regenerator ran (the first one: the others arrived in the same operation, like
    repeated Ctrl-C, and are dropped with it)."""
    try:
        interrupt = _deferred_interrupts.popleft()
    except IndexError:
        return
    _deferred_interrupts.clear()
    raise interrupt


def _callback_raised(exception: type[BaseException] | None, value: BaseException | None,
                     trace: Any) -> int:
    """cffi's ``onerror``: an exception escaped the callback. An interrupt (Ctrl-C arrives at any
    bytecode, also in vrange's own code around the regenerator) is kept for delivery at the next
    safe point, and the callback is called again: the faulting access must still complete. Anything
    else is a bug in vrange: logged, and the chunk fails by policy."""
    if value is not None and not isinstance(value, Exception):
        value.__traceback__ = None
        value.__context__ = None
        _deferred_interrupts.append(value)
        return RETRY
    logger.error("internal error while running a regenerator", exc_info=(
        exception, value, trace) if exception is not None and value is not None else None)
    return FAILED


@ffi.def_extern(error=FAILED, onerror=_callback_raised)
def vr_python_regenerate(python_handle: Any, offset: int, buffer: Any, length: int,
                         flags: int) -> int:
    regeneration = ffi.from_handle(python_handle)
    if regeneration.retired:
        return FAILED  # the region is closed: nothing may be written any more
    return run(regeneration, int(offset), buffer, int(length), int(flags))
