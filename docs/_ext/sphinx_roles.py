"""Griffe extension: read the package's reST-flavoured docstrings as Markdown.

noisejax docstrings use Google sections (``Args:``, ``Returns:``) with two reST habits:
roles (``:func:`x```) and literal blocks introduced by ``::``.  Before mkdocstrings
renders a docstring this extension turns a role into inline code and a literal block
into a fenced code block (Python for ``>>>`` examples).  The sources stay as they are.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const)?:`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(text: str) -> str:
    """Roles to inline code, ``::`` literal blocks to fenced code blocks."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            indent = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > indent:
                block_indent = _indent(lines[j])
                k = j
                block = []
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= block_indent):
                    block.append(lines[k][block_indent:])
                    k += 1
                while block and not block[-1].strip():
                    block.pop()
                head = stripped[:-2].rstrip()
                pad = " " * indent
                if head.strip() in ("Example", "Examples"):  # bold, so that it is not parsed as a section
                    out.append(pad + f"**{head.strip()}**")
                elif head.strip():
                    out.append(head + ":")
                lang = "python" if block[0].lstrip().startswith(">>>") else "text"
                out += ["", pad + "```" + lang] + [pad + b if b else "" for b in block] + [pad + "```"]
                out.append("")
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrites every docstring once the object tree is loaded."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = to_markdown(obj.docstring.value)
