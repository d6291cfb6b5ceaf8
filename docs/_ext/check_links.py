"""Internal link checker for the built site: every ``href``/``src`` to a local file must
exist (``make docs`` runs it; external links are not checked: CI has no internet).

  python docs/_ext/check_links.py docs/_build/html
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)


def broken(site: Path) -> list[str]:
    """``'<page>: <target>'`` for every local link of ``site`` whose file does not exist."""
    out = []
    for page in sorted(site.rglob("*.html")):
        if page.relative_to(site).parts[0] in ("_static", "_sources"):
            continue  # the theme's templates and the pages' sources, not pages
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for target in parser.targets:
            url = urlparse(target)
            if url.scheme or url.netloc or target.startswith(("#", "mailto:", "data:")):
                continue
            path = unquote(url.path)
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                out.append(f"{page.relative_to(site)}: {target}")
    return out


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "docs/_build/html")
    if not (site / "index.html").exists():
        print(f"check_links: no built site at {site}", file=sys.stderr)
        return 2
    bad = broken(site)
    for line in bad:
        print(f"broken link: {line}", file=sys.stderr)
    print(f"check_links: {len(bad)} broken internal link(s) in {site}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
