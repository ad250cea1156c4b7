"""README tables generated from the code: the `tms:` reference (from the config model's field
descriptions), which config keys decide which stage (from `stage_inputs.RULES`) and which
dataset types and run kinds TMS supports (from `dataset_support`).

    python -m tms_axolotl_plugin.docs           # print the tables
    python -m tms_axolotl_plugin.docs --write   # refresh them in README.md between the markers

A test keeps README.md in sync with all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from tms_axolotl_plugin import dataset_support, stage_inputs
from tms_axolotl_plugin.config import TMSConfig


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


# marker name in README.md -> the function that renders what goes between its markers
TABLES = {"tms-config-reference": reference_table, "tms-stage-inputs": stage_inputs.markdown_table,
          "tms-dataset-support": dataset_support.markdown_table}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def sync_readme(readme: Path) -> bool:
    """Rewrite every generated table in `readme`; True if anything changed."""
    original = text = readme.read_text()
    for name, render in TABLES.items():
        begin, end = markers(name)
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + "\n" + render() + "\n" + text[stop:]
    if text != original:
        readme.write_text(text)
    return text != original


if __name__ == "__main__":
    if "--write" in sys.argv:
        changed = sync_readme(Path(__file__).resolve().parents[1] / "README.md")
        print("README.md updated" if changed else "README.md already in sync")
    else:
        print("\n\n".join(render() for render in TABLES.values()))
