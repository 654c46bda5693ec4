"""A griffe extension for the docs build: the docstrings use Sphinx roles (:class:`~a.B`, :meth:`fit`)
and literal blocks introduced by ``::``, which Markdown does not know. Render each role as inline code
(`B`, `fit`) and each ``text::`` as ``text:``, as Sphinx shows them."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|obj|exc|data|const):`(~?)([^`]+)`")
LITERAL = re.compile(r"(?<=\S)::$", re.M)


def _plain(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = LITERAL.sub(":", ROLE.sub(_plain, obj.docstring.value))
