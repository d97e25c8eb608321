"""pytest plugin: run your own tests with a forced backend, injected purges or a restricted profile.

Installed with vrange and loaded by pytest through the ``pytest11`` entry point, it does nothing
unless asked: without one of its options and without its fixtures it adds only its options to
``--help`` (loading it imports the ``vrange`` package, which starts no thread, installs no signal
handler and probes nothing until a region is made).

Options (docs/testing-with-vrange.md):

``--vrange-backend=SPEC``
    Regions created without an explicit ``backend=`` use ``SPEC`` (``auto``, ``uffd``, ``sigbus``,
    ``sigbus:uffd``, ``sigbus:memfd``): ``$VRANGE_BACKEND`` is set for the session and restored
    afterwards. A spec that cannot run here is a usage error, with the reason from
    :func:`vrange.features`.
``--vrange-purge=every:N`` / ``--vrange-purge=random:P[,seed=S]``
    Inject purges while each test function runs: at every Nth *point*, or at each point with
    probability P. A point is a function call (Python or built-in) made by code outside vrange, on
    the test's thread or a thread it starts. At an injected purge every open region's volatile
    chunks are discarded (``vrange.testing.inject_purge``): on regions the kernel reclaims, every
    other injection pages them out (MADV_PAGEOUT) instead of purging, so both refill paths run.
    Pinned chunks are never touched. The random generator is seeded per test from the seed and the
    test's id: rerunning one test with the seed the header printed replays its purges.
``--vrange-profile=NAME``
    Run the whole session under a simulated restriction: ``seccomp-eperm``, ``seccomp-enosys``
    (userfaultfd denied as by a container's seccomp profile), or a simulated kernel from
    ``vrange.testing.KERNEL_PROFILES``. Irreversible for the pytest
    process: use it in a pytest run of its own.

Fixtures: :func:`vrange_backend`, :func:`vrange_purge`, :func:`vrange_region`.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import pytest

if TYPE_CHECKING:
    from vrange import Region

__all__ = ["PurgeSchedule", "vrange_backend", "vrange_purge", "vrange_region"]

BACKEND_ENVIRONMENT_VARIABLE = "VRANGE_BACKEND"
SECCOMP_PROFILES = {
    "seccomp-eperm": "userfaultfd denied with EPERM (Docker's default seccomp profile)",
    "seccomp-enosys": "userfaultfd denied with ENOSYS (other container runtimes)",
}


def profiles() -> dict[str, str]:
    """The profiles ``--vrange-profile`` accepts here (name → description): the seccomp ones and the
    simulated kernels of ``vrange.testing.KERNEL_PROFILES``."""
    from vrange import testing

    return {**SECCOMP_PROFILES, **testing.KERNEL_PROFILES}


# --- the purge schedule --------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeSchedule:
    """When purges are injected: at every ``n``-th point, or at each point with ``probability``."""

    mode: Literal["every", "random"]
    n: int = 1
    probability: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> PurgeSchedule:
        """``every:N`` (N ≥ 1) or ``random:P[,seed=S]`` (0 ≤ P ≤ 1; without a seed one is drawn,
        and shown by ``str()`` so that the run can be replayed). ValueError when malformed."""
        mode, _, rest = text.partition(":")
        if mode == "every":
            try:
                n = int(rest)
            except ValueError:
                n = 0
            if n < 1:
                raise ValueError(f"every:N needs a whole number N >= 1, not {rest!r}")
            return cls("every", n=n)
        if mode == "random":
            probability_text, _, seed_text = rest.partition(",")
            try:
                probability = float(probability_text)
            except ValueError:
                probability = -1.0
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"random:P needs a probability 0 <= P <= 1, not "
                                 f"{probability_text!r}")
            if not seed_text:
                return cls("random", probability=probability,
                           seed=int.from_bytes(os.urandom(4), "little"))
            key, _, value = seed_text.partition("=")
            if key != "seed" or not value.lstrip("-").isdigit():
                raise ValueError(f"expected seed=S (an integer) after the probability, not "
                                 f"{seed_text!r}")
            return cls("random", probability=probability, seed=int(value))
        raise ValueError(f"expected every:N or random:P[,seed=S], not {text!r}")

    def __str__(self) -> str:
        if self.mode == "every":
            return f"every:{self.n}"
        return f"random:{self.probability:g},seed={self.seed}"


def _is_vrange_module(name: str | None) -> bool:
    return name is not None and name.startswith("vrange") and (len(name) == 6 or name[6] == ".")


class PurgeInjector:
    """Counts the points of one test and injects purges at those the schedule picks.

    Installed with ``sys.setprofile`` (this thread) and ``threading.setprofile`` (threads started
    meanwhile) while the test function runs; any profile function already set keeps being called.
    """

    def __init__(self, schedule: PurgeSchedule, test_id: str) -> None:
        from vrange import testing

        self.schedule = schedule
        self.points = 0
        self.injections = 0
        """Points at which purges were injected while at least one region was open."""
        self.bytes_discarded = 0
        self._random = random.Random(f"{schedule.seed}:{test_id}")
        self._live_regions = testing.live_regions
        self._inject_purge = testing.inject_purge
        self._active = False
        self._previous: Any = None
        self._previous_threading: Any = None

    def start(self) -> None:
        self._previous = sys.getprofile()
        self._previous_threading = threading.getprofile()
        self._active = True
        threading.setprofile(self._on_event)
        sys.setprofile(self._on_event)

    def stop(self) -> None:
        self._active = False
        sys.setprofile(self._previous)
        threading.setprofile(self._previous_threading)

    def _on_event(self, frame: FrameType, event: str, arg: object) -> None:
        previous = self._previous
        if previous is not None:
            previous(frame, event, arg)
        if event != "call" and event != "c_call":
            return
        if not self._active:  # a thread the test started and left running
            sys.setprofile(self._previous_threading)
            return
        # For "call" the frame is the function called, for "c_call" the caller: either way, a
        # call made by vrange's own code is no point.
        if _is_vrange_module(frame.f_globals.get("__name__")):
            return
        self.points += 1
        schedule = self.schedule
        if schedule.mode == "every":
            if self.points % schedule.n:
                return
        elif self._random.random() >= schedule.probability:
            return
        # Inside a vrange call (a library method that called the standard library or a
        # regenerator, a finalizer run by the collector there) the thread may hold a lock of the
        # library: no purge then. Walked only at the points the schedule picks.
        caller = frame.f_back
        while caller is not None:
            if _is_vrange_module(caller.f_globals.get("__name__")):
                return
            caller = caller.f_back
        regions = self._live_regions()
        if not regions:
            return
        page_out = self.injections % 2 == 1
        self.injections += 1
        for region in regions:
            self.bytes_discarded += self._inject_purge(region, page_out=page_out)


# --- the session ---------------------------------------------------------------------------------


@dataclass
class _Totals:
    tests: int = 0
    points: int = 0
    injections: int = 0
    bytes_discarded: int = 0
    by_test: dict[str, int] = field(default_factory=dict)


class VRangeSession:
    """The plugin's state for one pytest session where at least one option was given (registered
    as the plugin ``vrange-session``)."""

    def __init__(self, config: pytest.Config, backend: str | None, purge: str | None,
                 profile: str | None) -> None:
        self.config = config
        self.backend = backend
        self.profile = profile
        self.schedule: PurgeSchedule | None = None
        self.totals = _Totals()
        self._saved_backend: str | None = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE)
        if purge is not None:
            try:
                self.schedule = PurgeSchedule.parse(purge)
            except ValueError as error:
                raise pytest.UsageError(f"--vrange-purge={purge}: {error}") from None
        if profile is not None:
            self._apply_profile(profile)  # first: it changes which backends can run
        if backend is not None:
            self._check_backend(backend)
            os.environ[BACKEND_ENVIRONMENT_VARIABLE] = backend
            config.add_cleanup(self._restore_backend)

    @staticmethod
    def _apply_profile(name: str) -> None:
        from vrange import testing

        known = profiles()
        if name not in known:
            raise pytest.UsageError(f"--vrange-profile={name}: unknown profile; choose one of "
                                    f"{', '.join(sorted(known))}")
        if name in SECCOMP_PROFILES:
            testing.deny_userfaultfd(errno.EPERM if name == "seccomp-eperm" else errno.ENOSYS)
        else:
            testing.simulate_kernel(name)  # type: ignore[attr-defined]

    def _check_backend(self, spec: str) -> None:
        from vrange import BackendUnavailable
        from vrange._backends import KNOWN_SPECS, resolve_backend

        if spec not in KNOWN_SPECS:
            raise pytest.UsageError(f"--vrange-backend={spec}: unknown backend; choose one of "
                                    f"{', '.join(KNOWN_SPECS)}")
        try:
            resolve_backend(spec)
        except BackendUnavailable as error:
            under = f" under --vrange-profile={self.profile}" if self.profile else ""
            raise pytest.UsageError(f"--vrange-backend={spec} cannot run here{under}: "
                                    f"{error}") from None

    def _restore_backend(self) -> None:
        if self._saved_backend is None:
            os.environ.pop(BACKEND_ENVIRONMENT_VARIABLE, None)
        else:
            os.environ[BACKEND_ENVIRONMENT_VARIABLE] = self._saved_backend

    # --- hooks ------------------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = []
        if self.backend is not None:
            from vrange._backends import resolve_backend

            choice = resolve_backend(self.backend)
            trap = f" ({choice.trap} trap)" if choice.trap else ""
            lines.append(f"vrange: --vrange-backend={self.backend}: regions without backend= use "
                         f"{choice.name}{trap}")
        if self.schedule is not None:
            lines.append(f"vrange: --vrange-purge={self.schedule} (replay with this exact "
                         "option)")
        if self.profile is not None:
            lines.append(f"vrange: --vrange-profile={self.profile}: {profiles()[self.profile]}")
        return lines

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        if self.schedule is None:
            return (yield)
        injector = PurgeInjector(self.schedule, item.nodeid)
        injector.start()
        try:
            return (yield)
        finally:
            injector.stop()
            totals = self.totals
            totals.tests += 1
            totals.points += injector.points
            totals.injections += injector.injections
            totals.bytes_discarded += injector.bytes_discarded
            if injector.injections:
                totals.by_test[item.nodeid] = injector.injections
                item.add_report_section(
                    "call", "vrange",
                    f"{injector.injections} injected purges ({injector.bytes_discarded} bytes) at "
                    f"{injector.points} points; replay: pytest "
                    f"'{item.config.cwd_relative_nodeid(item.nodeid)}' "
                    f"--vrange-purge={self.schedule}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.schedule is None:
            return
        totals = self.totals
        terminalreporter.write_line(
            f"vrange: {totals.injections} injected purges, {totals.bytes_discarded} bytes, at "
            f"{totals.points} points in {totals.tests} tests (--vrange-purge={self.schedule})")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vrange", "vrange (volatile ranges): see docs/testing-with-vrange.md")
    group.addoption(
        "--vrange-backend", metavar="SPEC", default=None,
        help="regions created without backend= use SPEC: auto, uffd, sigbus, sigbus:uffd or "
             "sigbus:memfd (sets $VRANGE_BACKEND for the session)")
    group.addoption(
        "--vrange-purge", metavar="SCHEDULE", default=None,
        help="inject purges of every open region's volatile chunks while tests run: every:N "
             "(every Nth point) or random:P[,seed=S] (each point with probability P); a point "
             "is a function call outside vrange")
    group.addoption(
        "--vrange-profile", metavar="NAME", default=None,
        help="run the session under a simulated restriction: seccomp-eperm, seccomp-enosys, or "
             "a simulated kernel of vrange.testing.KERNEL_PROFILES (irreversible for the pytest "
             "process)")


def pytest_configure(config: pytest.Config) -> None:
    backend = config.getoption("--vrange-backend")
    purge = config.getoption("--vrange-purge")
    profile = config.getoption("--vrange-profile")
    if backend is None and purge is None and profile is None:
        return  # off unless asked
    config.pluginmanager.register(VRangeSession(config, backend, purge, profile), "vrange-session")


def _session(config: pytest.Config) -> VRangeSession | None:
    plugin = config.pluginmanager.get_plugin("vrange-session")
    return plugin if isinstance(plugin, VRangeSession) else None


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def vrange_backend(request: pytest.FixtureRequest) -> str:
    """The backend spec regions get when they name none: ``--vrange-backend``, else
    ``$VRANGE_BACKEND``, else ``"auto"``."""
    session = _session(request.config)
    if session is not None and session.backend is not None:
        return session.backend
    return os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or "auto"


@pytest.fixture
def vrange_purge(request: pytest.FixtureRequest) -> Callable[..., int]:
    """``vrange_purge(region=None, *, page_out=False) -> int``: discard the volatile chunks of
    ``region`` (of every open region by default) now, from anywhere in the test; returns the bytes
    discarded (``vrange.testing.inject_purge``). Counted in ``--vrange-purge``'s summary."""
    from vrange import testing

    session = _session(request.config)

    def purge_now(region: Region | None = None, *, page_out: bool = False) -> int:
        discarded = testing.inject_purge(region, page_out=page_out)
        if session is not None:
            session.totals.injections += 1
            session.totals.bytes_discarded += discarded
        return discarded

    return purge_now


@pytest.fixture
def vrange_region(request: pytest.FixtureRequest) -> Iterator[Callable[..., Region]]:
    """``vrange_region(nbytes, regenerate, **options) -> Region``: a region (with the session's
    backend unless ``backend=`` is given) that is closed when the test ends. One that cannot be
    closed then, because a memoryview or array still exports it, fails the test's teardown, naming
    it (a region left open)."""
    import vrange

    made: list[vrange.Region] = []

    def make(nbytes: int, regenerate: Any, **options: Any) -> vrange.Region:
        region = vrange.Region(nbytes, regenerate, **options)
        made.append(region)
        return region

    yield make
    left_open = []
    for region in made:
        try:
            region.close()
        except BufferError as error:
            left_open.append(f"{region!r}: {error}")
    if left_open:
        pytest.fail("vrange_region: left open (still exported when the test ended):\n"
                    + "\n".join(left_open), pytrace=False)
