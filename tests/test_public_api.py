"""The public surface is a fixed list: every name documented exists, nothing else leaks."""

from __future__ import annotations

import vrange

EXPECTED_PUBLIC_NAMES = {
    "DEFAULT_CHUNK_SIZE",
    "Region",
    "RegionStats",
    "io",
    "policy",
    "sources",
    "BackendUnavailable",
    "Features",
    "RegenerationError",
    "VRangeError",
    "VRangeOSError",
    "__version__",
    "available_backends",
    "features",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(vrange.__all__) == EXPECTED_PUBLIC_NAMES
    for name in vrange.__all__:
        assert hasattr(vrange, name), name


def test_exception_hierarchy() -> None:
    for exception in (vrange.BackendUnavailable, vrange.RegenerationError, vrange.VRangeOSError):
        assert issubclass(exception, vrange.VRangeError)
    assert issubclass(vrange.VRangeOSError, OSError)


def test_package_is_typed() -> None:
    from importlib import resources

    assert resources.files("vrange").joinpath("py.typed").is_file()


def test_the_submodules_list_their_public_names() -> None:
    import vrange.policy
    import vrange.sources

    assert set(vrange.sources.__all__) == {"File", "Isolated", "Source", "Zeros"}
    assert set(vrange.policy.__all__) == {"PolicyStats", "configure", "enforce", "set_budget",
                                          "stats", "stop"}
    for module in (vrange.sources, vrange.policy):
        for name in module.__all__:
            assert hasattr(module, name), name
