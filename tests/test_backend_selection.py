"""Which backend a region gets, and the errors when the one asked for cannot run."""

from __future__ import annotations

import errno

import pytest

import vrange
from vrange import sources
from vrange.testing import deny_userfaultfd


def test_auto_prefers_uffd_where_it_serves_syscalls(report: vrange.Features) -> None:
    if not report.backend("uffd").usable:
        pytest.skip(f"backend 'uffd' unavailable: {report.backend('uffd').reason}")
    assert report.auto_backend == "uffd"
    assert vrange.available_backends()[0] == "uffd"
    with vrange.Region(4096, sources.Zeros(), backend="auto") as region:
        assert region.backend == "uffd"


@pytest.mark.forked
@pytest.mark.parametrize("error_number", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_uffd_denied_by_seccomp_is_unavailable_with_the_reason(root_privileges: None,
                                                               error_number: int) -> None:
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
