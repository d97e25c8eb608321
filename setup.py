# Only here because cffi modules cannot be declared in pyproject.toml yet; all metadata is there.
from setuptools import setup

setup(cffi_modules=["src/vrange/_native/build.py:ffibuilder"])
