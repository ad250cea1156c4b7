"""The README's CPU demo: render `example_configs/tms_cpu_demo.yml` with offline paths.

    python -m tms_axolotl_plugin.demo OUT_DIR [ROWS]   -> prints the config path
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir

TEMPLATE = Path(__file__).resolve().parents[1] / "example_configs" / "tms_cpu_demo.yml"


def render_demo_config(out: Path, rows: int = 64, template: Path = TEMPLATE) -> Path:
    """Write a GSM8K subset and the demo config that trains on it; return the config path."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"gsm8k_train_{rows}.jsonl"
    lines = gsm8k_jsonl("train").read_text().splitlines(keepends=True)[:rows]
    data.write_text("".join(lines))
    config = string.Template(template.read_text()).substitute(
        SMOLLM2_DIR=smollm2_dir(), DATA_FILE=data, OUTPUT_DIR=out)
    path = out / "config.yml"
    path.write_text(config)
    return path


if __name__ == "__main__":
    print(render_demo_config(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64))
