# Only here because cffi modules cannot be declared in pyproject.toml yet; all metadata is there.
from setuptools import setup
from setuptools.command.build_py import build_py

CFFI_BUILD_SCRIPT = ("vrange._native", "build")


class build_py_without_build_script(build_py):
    """Leaves the cffi build script out of the wheel: setuptools runs it by path (cffi_modules), and
    nothing imports it at run time. The sdist keeps it (MANIFEST.in)."""

    def find_package_modules(self, package, package_dir):
        return [module for module in super().find_package_modules(package, package_dir)
                if module[:2] != CFFI_BUILD_SCRIPT]


setup(cffi_modules=["src/vrange/_native/build.py:ffibuilder"],
      cmdclass={"build_py": build_py_without_build_script})
