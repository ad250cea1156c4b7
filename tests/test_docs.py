"""README's `tms:` reference is generated from the schema and must match it."""

from conftest import REPO
from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.docs import BEGIN, END, reference_table


def test_readme_reference_matches_the_schema():
    text = (REPO / "README.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert table == reference_table(), "run: python -m tms_axolotl_plugin.docs --write"


def test_every_field_has_a_description():
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}.{name}")

    walk(TMSConfig, "tms")
