"""Which backend a region gets, and the errors when the one asked for cannot run."""

from __future__ import annotations

import errno

import pytest

import vrange
from vrange import sources
from vrange.testing import deny_userfaultfd


@pytest.mark.requires("uffd_backend", "(auto picks it where it runs)")
def test_auto_prefers_uffd_where_it_serves_syscalls(report: vrange.Features) -> None:
    assert report.auto_backend == "uffd"
    assert vrange.available_backends()[0] == "uffd"
    with vrange.Region(4096, sources.Zeros(), backend="auto") as region:
        assert region.backend == "uffd"


@pytest.mark.forked
@pytest.mark.requires("root", "(to install a seccomp filter)")
@pytest.mark.parametrize("error_number", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_uffd_denied_by_seccomp_is_unavailable_with_the_reason(error_number: int) -> None:
    deny_userfaultfd(error_number)
    report = vrange.features(refresh=True)
    name = errno.errorcode[error_number]
    with pytest.raises(vrange.BackendUnavailable, match=f"backend 'uffd' cannot run here: .*{name}"):
        vrange.Region(4096, sources.Zeros(), backend="uffd")
    assert "uffd" not in vrange.available_backends()
    if report.backend("sigbus").usable:
        assert report.auto_backend == "sigbus"
        assert report.auto_reason.startswith("sigbus: uffd is unusable")
        with vrange.Region(4096, sources.Zeros(), backend="auto") as region:
            assert region.backend == "sigbus"
    else:
        with pytest.raises(vrange.BackendUnavailable, match="no backend can run"):
            vrange.Region(4096, sources.Zeros(), backend="auto")


def test_a_spec_forces_a_backend_and_trap(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = backend
    expected = {"sigbus:uffd": ("sigbus", "uffd"), "sigbus:memfd": ("sigbus", "memfd"),
                "uffd": ("uffd", None)}[spec]
    with vrange.Region(4096, sources.Zeros(), backend=spec) as region:
        assert (region.backend, region.trap) == expected
        assert region.kernel_reclaims == (expected[1] != "memfd")
    monkeypatch.setenv("VRANGE_BACKEND", spec)
    with vrange.Region(4096, sources.Zeros()) as region:
        assert (region.backend, region.trap) == expected


@pytest.mark.requires("sigbus_backend", "(it asks for plain 'sigbus')")
def test_plain_sigbus_uses_the_trap_the_report_prefers(report: vrange.Features) -> None:
    with vrange.Region(4096, sources.Zeros(), backend="sigbus") as region:
        assert region.trap == report.backend("sigbus").trap
        assert region.stats().trap == region.trap


@pytest.mark.parametrize("spec", ["sigbus:", "sigbus:shm", "uffd:uffd", "SIGBUS", ":memfd"])
def test_unknown_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        vrange.Region(4096, sources.Zeros(), backend=spec)
