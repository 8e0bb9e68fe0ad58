"""The Markdown table every report writes."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str = "---") -> str:
    """A Markdown table of `rows` under `header`; `align` is each column's rule (`---:` for
    right-aligned numbers); cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + f"{align}|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
