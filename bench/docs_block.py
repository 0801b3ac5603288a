"""The generated blocks of the performance page: each between `<!-- NAME:start -->` and
`<!-- NAME:end -->` in docs/explanation/performance.md, rewritten by the benchmark tools."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
PERFORMANCE = REPOSITORY / "docs" / "explanation" / "performance.md"


def replace_block(name: str, text: str, page: Path = PERFORMANCE) -> None:
    """Put `text` between the page's two `name` markers, in place of what was there.

    Raises:
        ValueError: when the page lacks the markers.
    """
    content = page.read_text(encoding="utf-8")
    first, last = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if first not in content or last not in content:
        raise ValueError(f"{page} has no {first} ... {last} block")
    start, end = content.index(first) + len(first), content.index(last)
    page.write_text(content[:start] + f"\n{text.strip()}\n" + content[end:], encoding="utf-8")
