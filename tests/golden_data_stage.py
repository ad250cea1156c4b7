"""What the data stage gives on the demo data and on every chat format, as digests.

`tests/golden/data_stage.json` was recorded with the data stage as it was before the on-disk
cache (every row tokenized in each process, turns as Python objects): the cached stage must give
exactly the same prompts, answers, held-out split, requests, mixture rows and fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import base_config, write_config

from tms_axolotl_plugin.label_store import GeneratedLabel

GOLDEN = Path(__file__).parent / "golden" / "data_stage.json"


def sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def demo_config(workdir: Path):
    """`make demo`'s config (SmolLM2, 64 GSM8K rows, 10% held out), output under workdir."""
    import yaml

    from tms_axolotl_plugin.demo import render_demo_config

    path = render_demo_config(workdir / "demo", 64)
    raw = yaml.safe_load(path.read_text())
    return path, raw


def formats_config(workdir: Path, tiny_model_dir: Path):
    """The chat formats of tests/test_chat_formats_e2e.py, 8 rows each, tiny model."""
    from test_chat_formats_e2e import ENTRIES, NUMBERS, format_rows

    datasets = []
    for kind, entry in ENTRIES.items():
        path = workdir / "formats" / f"{kind}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(format_rows(kind, a, b)) + "\n" for a, b in NUMBERS))
        datasets.append({"path": str(path), "ds_type": "json", "split": "train", **entry})
    raw = base_config(tiny_model_dir, workdir / "unused.jsonl", workdir / "formats" / "out",
                      datasets=datasets, sequence_len=96, num_epochs=2,
                      plugins=["tms_axolotl_plugin.TMSPlugin"],
                      tms={"num_checkpoints": 3, "alpha": 0.25, "seed": 3,
                           "pld": {"enabled": True, "heldout_size": 6},
                           "retention": {"enabled": False},
                           "generation": {"max_new_tokens": 16}})
    raw.pop("max_steps", None)
    return write_config(workdir / "formats" / "cfg.yml", raw), raw


def build_configs(workdir: Path, tiny_model_dir: Path):
    return {"demo": demo_config(workdir), "formats": formats_config(workdir, tiny_model_dir)}


def load(config_path: Path, raw: dict):
    from axolotl.cli.config import load_cfg

    from tms_axolotl_plugin.config import tms_config_from

    out = Path(raw["output_dir"]) / "tms"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_cfg(str(config_path))
    return cfg, tms_config_from(cfg)


def synthetic_label(key: str, checkpoint: int) -> GeneratedLabel:
    """A stand-in answer for the mixture comparison: some truncated, some empty."""
    code = int(key[:4], 16)
    finish = "length" if code % 7 == 0 else "stop"
    text = "" if code % 11 == 0 else f"answer {key[:6]} from {checkpoint}"
    return GeneratedLabel(key, checkpoint, text, finish, 5, 10)


def rows_digest(paths: list[Path]) -> list[str]:
    return [sha([json.loads(line) for line in Path(p).read_text().splitlines()]) for p in paths]


def turn_record(dataset_index, num_tokens, turns) -> str:
    """One row's trained turns: (position, prompt, answer, kept) as digests."""
    return sha([dataset_index, num_tokens,
                [[t[0], sha(list(t[1])), sha(list(t[2])), t[3]] for t in turns]])
