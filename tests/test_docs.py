"""README's generated tables (the `tms:` reference, the stage-inputs table) must match the code."""

import pytest

from conftest import REPO
from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.docs import TABLES, markers


@pytest.mark.parametrize("name", sorted(TABLES))
def test_readme_tables_match_the_code(name):
    text = (REPO / "README.md").read_text()
    begin, end = markers(name)
    table = text[text.index(begin) + len(begin): text.index(end)].strip()
    assert table == TABLES[name](), "run: python -m tms_axolotl_plugin.docs --write"


def test_every_field_has_a_description():
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}.{name}")

    walk(TMSConfig, "tms")
