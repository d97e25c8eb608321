"""A Griffe extension for the docs site (mkdocs.yml loads it; it changes only what mkdocstrings
renders, never the source).

vrange's docstrings are reST-ish, the site renders Markdown: Sphinx roles (:meth:`purge`) become
code spans, the name a reader would type, and a "::" that opens a literal block becomes ":". Special
methods without a docstring of their own (``__new__``, ``__repr__``, ``__enter__``, ``__slots__``...)
are left out of the reference: the class docstring says how to make and use the object (``__init__``
stays, merged into the class's signature)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(meth|func|class|mod|attr|data|exc|obj):`~?([^`]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::(\n\n)")


def _code(match: re.Match[str]) -> str:
    role, name = match.groups()
    if role in ("meth", "func") and not name.endswith(")"):
        name += "()"
    return f"``{name}``"


def markdown_docstring(text: str) -> str:
    return LITERAL_BLOCK.sub(r"\1:\2", ROLE.sub(_code, text))


class SphinxRolesToCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        for name, member in list(cls.members.items()):
            if name.startswith("__") and name.endswith("__") and name != "__init__" \
                    and member.docstring is None:
                cls.del_member(name)
