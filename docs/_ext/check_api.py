"""Every public name (each module's ``__all__``) of the modules in docs/api.md must be in
the built site's inventory (``make docs`` runs it).

  python docs/_ext/check_api.py docs/_build/html
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent
PACKAGES = ("tgd_jax", "tgd_jax.train", "tgd_jax.pet", "tgd_jax.sim")


def documented(site: Path) -> set[str]:
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    names: set[str] = set()
    for entries in inventory.values() if isinstance(inventory, dict) else [
            dict(inventory.data.get(k, {})) for k in inventory.data]:
        names.update(entries)
    return names


def modules() -> list[str]:
    """Every module with public names in the packages (all must be in docs/api.md)."""
    out = []
    for package in PACKAGES:
        folder = DOCS.parent / package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            if path.stem.startswith("_"):
                continue
            out.append(f"{package}.{path.stem}")
    return out


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else DOCS / "_build" / "html")
    listed = set(re.findall(r"automodule:: (\S+)", (DOCS / "api.md").read_text()))
    names = documented(site)
    missing = []
    for module in modules():
        public = getattr(importlib.import_module(module), "__all__", [])
        if public and module not in listed:
            missing.append(f"{module} (not in docs/api.md)")
            continue
        missing += [f"{module}.{n}" for n in public if f"{module}.{n}" not in names]
    for name in missing:
        print(f"undocumented: {name}", file=sys.stderr)
    print(f"check_api: {len(missing)} public name(s) missing from the API reference")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
