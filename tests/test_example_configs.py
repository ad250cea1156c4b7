"""The example configs load through Axolotl's own config loading (plugins prepared first)."""

from conftest import REPO


def test_cpu_demo_config_loads_through_axolotl(tmp_path):
    from axolotl.cli.config import load_cfg

    from tms_axolotl_plugin.demo import render_demo_config

    cfg = load_cfg(str(render_demo_config(tmp_path, rows=16)))
    assert cfg.tms["num_checkpoints"] == 4 and cfg.tms["generation"]["max_new_tokens"] == 320
    assert cfg.sample_packing and cfg.plugins == ["tms_axolotl_plugin.TMSPlugin"]
    assert (REPO / "example_configs" / "tms_cpu_demo.yml").exists()
