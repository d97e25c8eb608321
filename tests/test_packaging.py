"""The installed distribution is the one a release ships: one version, written once; the metadata PyPI
shows (license, project URLs, Python versions); a package without build inputs. Fast: nothing is
built here. The sdist and the manylinux wheel themselves are built and checked by ``.ci/wheel``."""

from __future__ import annotations

import json
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import run_python

import vrange

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = metadata.distribution("vrange")
SUPPORTED_PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
PROJECT_URLS = {"Homepage", "Documentation", "Source", "Issues", "Changelog"}


def test_the_version_is_vrange_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", vrange.__version__)
    assert metadata.version("vrange") == vrange.__version__


def test_the_version_is_written_once() -> None:
    """pyproject.toml reads it from vrange.__version__ instead of writing it again."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("run from an installed copy of the tests, without pyproject.toml beside them")
    config = tomllib.loads(pyproject.read_text())
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vrange.__version__"}


def test_license_metadata_and_file() -> None:
    assert DISTRIBUTION.metadata["License-Expression"] == "MIT"
    assert DISTRIBUTION.metadata.get_all("License-File") == ["LICENSE"]
    licenses = [path for path in DISTRIBUTION.files or [] if path.name == "LICENSE"]
    assert len(licenses) == 1, DISTRIBUTION.files
    assert licenses[0].read_text().startswith("MIT License")


def test_project_urls() -> None:
    urls = dict(entry.split(", ", 1) for entry in DISTRIBUTION.metadata.get_all("Project-URL") or [])
    assert set(urls) == PROJECT_URLS
    for label, url in urls.items():
        assert url.startswith("https://"), (label, url)


def test_python_version_classifiers_match_requires_python() -> None:
    classifiers = DISTRIBUTION.metadata.get_all("Classifier") or []
    versions = [entry.rsplit(" :: ", 1)[1] for entry in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", entry)]
    assert versions == SUPPORTED_PYTHONS
    assert DISTRIBUTION.metadata["Requires-Python"] == f">={SUPPORTED_PYTHONS[0]}"
    assert "License :: OSI Approved :: MIT License" not in classifiers  # PEP 639: the expression only
    assert any(entry.startswith("Development Status :: ") for entry in classifiers)


def _editable() -> bool:
    direct_url = DISTRIBUTION.read_text("direct_url.json")
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def test_the_installed_package_has_no_build_inputs() -> None:
    """The C sources and headers, cffi's generated C and its build script are in the sdist only:
    nothing reads them at run time. The compiled core and py.typed are there."""
    if _editable():
        pytest.skip("an editable install runs from the source tree, which has the build inputs")
    package = Path(vrange.__file__).parent
    installed = [path.relative_to(package).as_posix() for path in package.rglob("*")
                 if path.is_file() and "__pycache__" not in path.parts]
    leftovers = [name for name in installed
                 if name.endswith((".c", ".h", ".o")) or name == "_native/build.py"]
    assert leftovers == []
    assert "py.typed" in installed
    assert [name for name in installed if re.fullmatch(r"_vrange_native\..*\.so", name)]
    recorded = [str(path) for path in DISTRIBUTION.files or []]
    assert not [name for name in recorded if name.endswith((".c", ".h", ".o"))]


def test_the_sdist_tests_log_hangs_to_a_file_of_the_users_own() -> None:
    """The suite's hang guard appends to a log file in the temporary directory: one per user, so
    that a user who runs the sdist's tests after root (or another user) did is not refused the
    file in every test's setup."""
    paths = {}
    for uid in (0, 65534):
        result = run_python(f"import os\nos.getuid = lambda: {uid}\nimport conftest\n"
                            "print(conftest.HANG_LOG_PATH)",
                            env={"VRANGE_HANG_LOG": "", "PYTHONPATH": str(ROOT / "tests")})
        assert result.returncode == 0, result.stderr
        paths[uid] = Path(result.stdout.strip())
    assert paths[0] != paths[65534]
    assert all(path.parent == Path(tempfile.gettempdir()) for path in paths.values()), paths
