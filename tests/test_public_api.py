"""The public surface is a fixed list: every name documented exists, nothing else leaks."""

from __future__ import annotations

import vrange

EXPECTED_PUBLIC_NAMES = {
    "DEFAULT_CHUNK_SIZE",
    "Region",
    "Pin",
    "BackendName",
    "ErrorPolicy",
    "RegionStats",
    "io",
    "policy",
    "sources",
    "BackendUnavailable",
    "Cache",
    "CacheFullError",
    "CacheStats",
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
    for exception in (vrange.BackendUnavailable, vrange.RegenerationError, vrange.VRangeOSError,
                      vrange.CacheFullError):
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


def test_the_testing_helpers_and_the_pytest_plugin_list_their_public_names() -> None:
    import vrange.pytest_plugin
    import vrange.testing

    # vrange.testing may also have the simulated kernels (KERNEL_PROFILES, simulate_kernel).
    assert {"deny_userfaultfd", "inject_purge", "live_regions", "page_out"} <= \
        set(vrange.testing.__all__)
    assert set(vrange.pytest_plugin.__all__) == {"PurgeSchedule", "vrange_backend",
                                                 "vrange_purge", "vrange_region"}
    for module in (vrange.testing, vrange.pytest_plugin):
        for name in module.__all__:
            assert hasattr(module, name), name


def test_the_pytest_plugin_is_registered_under_its_entry_point() -> None:
    from importlib.metadata import entry_points

    (plugin,) = [entry for entry in entry_points(group="pytest11") if entry.name == "vrange"]
    assert plugin.value == "vrange.pytest_plugin"
