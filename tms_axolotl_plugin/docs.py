"""The `tms:` reference table, generated from the config model's field descriptions.

    python -m tms_axolotl_plugin.docs           # print the table
    python -m tms_axolotl_plugin.docs --write   # refresh it in README.md between the markers

A test keeps README.md in sync with the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from tms_axolotl_plugin.config import TMSConfig

BEGIN = "<!-- tms-config-reference:begin -->"
END = "<!-- tms-config-reference:end -->"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    return "-" if field.default is None else f"`{field.default!r}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, key)
            continue
        kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        kind = kind.replace("|", "or")
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {kind} | {_default(field)} | {description} |")
    return rows


def reference_table() -> str:
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    return "\n".join(header + _rows(TMSConfig, "tms"))


def sync_readme(readme: Path) -> bool:
    """Rewrite the table in `readme`; True if it changed."""
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    updated = text[:start] + "\n" + reference_table() + "\n" + text[end:]
    if updated != text:
        readme.write_text(updated)
    return updated != text


if __name__ == "__main__":
    if "--write" in sys.argv:
        changed = sync_readme(Path(__file__).resolve().parents[1] / "README.md")
        print("README.md updated" if changed else "README.md already in sync")
    else:
        print(reference_table())
