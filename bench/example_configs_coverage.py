"""Which of Axolotl's own example configs TMS accepts: plain Axolotl vs Axolotl with the plugin.

    PYTHONPATH=. $(scripts/env.sh trainer)/bin/python bench/example_configs_coverage.py \
        /tmp/axolotl-examples/examples [more dirs ...] [--with-installed-examples] \
        --source "axolotl@<commit>"

For every YAML under the given directories that is an SFT training config (configs with `rl:`
and files that are not training configs, e.g. cloud-launcher settings, are skipped and
counted), the model keys (`base_model`, `base_model_config`, `tokenizer_config`) are pointed at
the project's local tiny Llama, `output_dir`/`dataset_prepared_path` at a temporary folder, and
the config is validated twice, offline, with Axolotl's own `prepare_plugins` + `validate_config`
(the validation `axolotl train` runs): as it is, then with the plugin and `tms: {}` added.
Validation reads no dataset (paths and Hub names are only strings there), so datasets are left as
they are. GPU capabilities are those of one sm_90 GPU with bf16 (the hardware the examples
target), not this machine's. Relative paths (`deepspeed: deepspeed_configs/...`) resolve
against the parent of each examples directory, as in an Axolotl checkout.

Writes bench/results/example_configs_coverage.{json,md} and prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

RESULTS = Path(__file__).parent / "results"
PLUGIN = "tms_axolotl_plugin.TMSPlugin"
MODEL_KEYS = ("base_model", "base_model_config", "tokenizer_config")
CAPABILITIES = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": 1,
                "compute_capability": "sm_90"}


def reset_plugins() -> None:
    from axolotl.integrations.base import PluginManager, reset_plugin_entry_points_cache

    reset_plugin_entry_points_cache()
    instance = PluginManager._instance
    if instance is not None:
        instance.plugins.clear()
        instance._cfg = None


def validate(cfg: dict, cwd: Path) -> tuple[bool, str]:
    """Axolotl's validation of `cfg` in `cwd`; (accepted, error message). Leaves no state."""
    import torch
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    env = dict(os.environ)
    here = Path.cwd()
    reset_plugins()
    try:
        os.chdir(cwd)
        config = DictDefault(copy.deepcopy(cfg))
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_plugins(config)
            validate_config(config, capabilities=dict(CAPABILITIES),
                            env_capabilities={"torch_version": torch.__version__.split("+")[0]})
        return True, ""
    except BaseException as error:  # every failure is a result here
        if isinstance(error, KeyboardInterrupt):
            raise
        return False, f"{type(error).__name__}: {error}"
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        reset_plugins()


def tms_reason(message: str) -> tuple[str, str]:
    """(short category, the plugin's sentence) of a rejection by the plugin."""
    match = re.search(r"Value error, (.*?)(?: \[type=value_error|$)", message, re.DOTALL)
    text = match.group(1).strip() if match else message.strip()
    patterns = [
        (r"datasets\[\d+\]\.type is (missing|'[^']*'|.*?):", lambda m: f"dataset type {m[1]}"),
        (r"datasets\[\d+\]\.(shards|weight)", lambda m: f"datasets[].{m[1]}"),
        (r"datasets\[\d+\]\.type\.field_output", lambda m: "dict type: answer field in prompt"),
        (r"^`(\w+): .*?` marks", lambda m: f"run kind `{m[1]}`"),
        (r"^plugin `([^`]+)` runs", lambda m: f"plugin `{m[1]}`"),
        (r"cannot be combined with `rl", lambda m: "rl"),
        (r"`train_on_inputs: true`", lambda m: "`train_on_inputs: true`"),
        (r"`test_datasets` is not supported", lambda m: "`test_datasets`"),
        (r"whole number of epochs", lambda m: "fractional `num_epochs`"),
    ]
    for pattern, name in patterns:
        found = re.search(pattern, text)
        if found:
            return name(found), text
    return "other", text


def plain_reason(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Value error")), None)
    if "validation error" in first and len(lines) > 1:
        return (detail or f"{lines[1]}: {lines[2] if len(lines) > 2 else ''}")[:240]
    return first[:240]


def dataset_types(cfg: dict) -> list[str]:
    entries = cfg.get("datasets") or []
    return ["dict" if isinstance(d.get("type"), dict) else str(d.get("type"))
            for d in entries if isinstance(d, dict)]


def is_training_config(cfg: object) -> bool:
    return isinstance(cfg, dict) and "base_model" in cfg and (
        "datasets" in cfg or "pretraining_dataset" in cfg)


def prepared(cfg: dict, model: Path, scratch: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    for key in MODEL_KEYS:
        if key in cfg or key == "base_model":
            cfg[key] = str(model)
    cfg["output_dir"] = str(scratch / "out")
    cfg["dataset_prepared_path"] = str(scratch / "prepared")
    return cfg


def survey(dirs: list[Path], model: Path) -> dict:
    configs, skipped = [], []
    scratch = Path(tempfile.mkdtemp(prefix="tms-coverage-"))
    for root in dirs:
        for path in sorted([*root.rglob("*.yml"), *root.rglob("*.yaml")]):
            name = f"{root.name}/{path.relative_to(root)}"
            try:
                raw = yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                skipped.append({"config": name, "reason": f"not valid YAML ({error})"[:120]})
                continue
            if not is_training_config(raw):
                skipped.append({"config": name, "reason": "not a training config (no "
                                "base_model + datasets)"})
                continue
            if raw.get("rl"):
                skipped.append({"config": name, "reason": f"rl: {raw['rl']} (not SFT)"})
                continue
            cfg = prepared(raw, model, scratch)
            plain_ok, plain_error = validate(cfg, root.parent)
            with_tms = {**cfg, "plugins": [*(cfg.get("plugins") or []), PLUGIN], "tms": {}}
            tms_ok, tms_error = validate(with_tms, root.parent)
            entry = {"config": name, "types": dataset_types(raw),
                     "plain_accepts": plain_ok, "plugin_accepts": tms_ok}
            if not plain_ok:
                entry["plain_error"] = plain_reason(plain_error)
            if not plain_ok:
                entry["category"] = "plain Axolotl rejects"
            elif not tms_ok:
                entry["category"], entry["message"] = tms_reason(tms_error)
            configs.append(entry)
            print(f"{'ok ' if tms_ok else 'no '}{name}: "
                  f"{entry.get('category', 'accepted')}", file=sys.stderr)
    return {"configs": configs, "skipped": skipped}


def summarise(result: dict) -> dict:
    configs = result["configs"]
    plain = [c for c in configs if c["plain_accepts"]]
    by_reason = Counter(c["category"] for c in plain if not c["plugin_accepts"])
    return {
        "sft_configs": len(configs),
        "skipped": len(result["skipped"]),
        "skipped_by_reason": dict(Counter(
            "rl" if s["reason"].startswith("rl:") else s["reason"].split(" (")[0]
            for s in result["skipped"])),
        "plain_axolotl_accepts": len(plain),
        "plain_axolotl_rejects": len(configs) - len(plain),
        "plugin_accepts": sum(c["plugin_accepts"] for c in configs),
        "plugin_accepts_of_plain_accepted": sum(c["plugin_accepts"] for c in plain),
        "plugin_rejects_by_reason": dict(by_reason.most_common()),
        "plain_rejects_by_reason": dict(Counter(
            short_plain(c["plain_error"]) for c in configs if not c["plain_accepts"])),
    }


def short_plain(error: str) -> str:
    for needle, name in [("No module named", "a plugin's package is not installed here"),
                         ("ModuleNotFoundError", "a plugin's package is not installed here"),
                         ("ImportError", "a plugin's package is not installed here")]:
        if needle in error:
            return name
    return re.sub(r"\s+", " ", error)[:100]


def markdown(result: dict) -> str:
    s = result["summary"]
    skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped_by_reason"].items())
    rejected = s["plain_axolotl_accepts"] - s["plugin_accepts_of_plain_accepted"]
    lines = [
        "# Axolotl example configs: accepted by TMS?", "",
        (f"Source: {result['source']}. Model keys pointed at the local tiny Llama; validated "
         "offline with Axolotl 0.21's `prepare_plugins` + `validate_config` as on one sm_90 GPU "
         "with bf16; then again with `plugins: [..., tms_axolotl_plugin.TMSPlugin]` and "
         "`tms: {}`."), "",
        f"Command: `{result['command']}`", "",
        "| | configs |", "|---|---|",
        f"| YAML files skipped | {s['skipped']} ({skipped}) |",
        f"| SFT configs validated | {s['sft_configs']} |",
        f"| plain Axolotl accepts | {s['plain_axolotl_accepts']} |",
        (f"| **plugin accepts** (of those plain Axolotl accepts) | "
         f"**{s['plugin_accepts_of_plain_accepted']}** / {s['plain_axolotl_accepts']} |"),
        f"| plugin rejects (of those plain Axolotl accepts) | {rejected} |", "",
        "## Rejected by the plugin, by reason (configs plain Axolotl accepts)", "",
        "| reason | configs |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in s["plugin_rejects_by_reason"].items()]
    lines += ["", "## Rejected by plain Axolotl already", "", "| reason | configs |", "|---|---|"]
    lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in s["plain_rejects_by_reason"].items()]
    lines += ["", "## Per config", "",
              "| config | `type`s | plain Axolotl | plugin | reason |", "|---|---|---|---|---|"]
    for c in result["configs"]:
        if c["plugin_accepts"]:
            reason = ""
        elif not c["plain_accepts"]:
            reason = "plain: " + c["plain_error"].replace("|", "/")[:160]
        else:
            reason = c["category"]
        types = ", ".join(sorted(set(c["types"]))) or "-"
        lines.append(f"| `{c['config']}` | {types} | {'yes' if c['plain_accepts'] else 'no'} | "
                     f"{'yes' if c['plugin_accepts'] else 'no'} | {reason} |")
    lines += ["", "## Skipped", "", "| file | why |", "|---|---|"]
    lines += [f"| `{x['config']}` | {x['reason']} |" for x in result["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="examples/ directories")
    parser.add_argument("--with-installed-examples", action="store_true",
                        help="also the example YAMLs inside the installed axolotl package "
                        "(axolotl/integrations/*/examples)")
    parser.add_argument("--source", default="", help="where the examples come from")
    parser.add_argument("--model", type=Path, help="default: the project's tiny Llama")
    parser.add_argument("--out", default="example_configs_coverage")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.model is None:
        from tms_axolotl_plugin.offline_assets import tiny_llama_dir

        args.model = tiny_llama_dir()
    dirs = [d.resolve() for d in args.dirs]
    if args.with_installed_examples:
        import axolotl.integrations

        dirs.append(Path(axolotl.integrations.__file__).parent)
    result = survey(dirs, args.model)
    result = {
        "source": args.source or ", ".join(str(d) for d in dirs),
        "command": "python bench/example_configs_coverage.py " + " ".join(sys.argv[1:]),
        "capabilities": CAPABILITIES,
        "summary": summarise(result), **result,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
