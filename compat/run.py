"""The compatibility matrix from a source tree: ``python compat/run.py [options]``.

The scenarios, profiles and runner live in the installed package (:mod:`vrange.compat`); this is
``python -m vrange compat`` with the same options (``--json``, ``--profile``, ``--backend``,
``--scenario``, ``--list``, ``--timeout``, ``--progress``). The harness that runs it on other
kernels (under qemu) belongs here, beside it.
"""

from __future__ import annotations

import sys

from vrange.cli import main

if __name__ == "__main__":
    sys.exit(main(["compat", *sys.argv[1:]]))
