"""The stage-inputs table, row by row: changing a key reruns exactly the stages its row names.

A stage reruns when its fingerprint changes; these are the fingerprints the pipeline computes
(`Pipeline.fingerprints` calls `stage_fingerprints` on the config as given)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from conftest import base_config
from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.stage_inputs import (
    DEFAULT_RULE,
    RULES,
    STAGES,
    flat_config,
    rule_for,
    stage_fingerprints,
)

# Changed values for the `tms:` keys (each must stay a valid block).
TMS_CHANGES = {
    "tms.num_checkpoints": 3,
    "tms.alpha": 0.5,
    "tms.seed": 1,
    "tms.schedule": "iterative",
    "tms.student_init": "last_checkpoint",
    "tms.turns": "last",
    "tms.sidecar.engines": "one",
    "tms.generation.backend": "vllm",
    "tms.generation.temperature": 0.7,
    "tms.generation.top_p": 0.9,
    "tms.generation.top_k": 20,
    "tms.generation.min_p": 0.05,
    "tms.generation.repetition_penalty": 1.05,
    "tms.generation.presence_penalty": 0.5,
    "tms.generation.frequency_penalty": 0.5,
    "tms.generation.max_new_tokens": 64,
    "tms.generation.all_checkpoints": True,
    "tms.generation.batch_size": 4,
    "tms.sidecar.url": "http://127.0.0.1:8000",
    "tms.sidecar.urls": ["http://127.0.0.1:8000", "http://127.0.0.1:8001"],
    "tms.sidecar.transport": "uds",
    "tms.sidecar.host": "::1",
    "tms.sidecar.port": 8001,
    "tms.sidecar.allow_remote": True,
    "tms.sidecar.python": "/opt/vllm/bin/python",
    "tms.sidecar.cuda_visible_devices": "1",
    "tms.sidecar.extra_args": ["--kv-cache-dtype", "fp8"],
    "tms.sidecar.env": {"VLLM_ATTENTION_BACKEND": "FLASHINFER"},
    "tms.sidecar.api_key": "a-key",
    "tms.sidecar.startup_timeout_s": 60.0,
    "tms.sidecar.request_timeout_s": 60.0,
    "tms.sidecar.max_retries": 1,
    "tms.sidecar.concurrency": 8,
    "tms.pld.enabled": False,
    "tms.pld.eval_steps": 5,
    "tms.pld.heldout_size": 0.1,
    "tms.pld.max_examples": 8,
    "tms.pld.max_overhead": 0.1,
    "tms.retention.enabled": False,
    "tms.retention.prompts": "prompts.txt",
    "tms.retention.max_prompts": 5,
    "tms.retention.max_new_tokens": 16,
    "tms.retention.mc_max_questions": 5,
}
# Set through a file or folder in `raw_config` (they must exist to validate).
TMS_PATH_KEYS = ("tms.harvest_from", "tms.retention.mc_path")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_inputs")
    harvest = root / "sft"
    (harvest / "checkpoint-1").mkdir(parents=True)
    (harvest / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")
    (root / "mc.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    return {"tms.harvest_from": str(harvest), "tms.retention.mc_path": str(root / "mc.jsonl"),
            "root": root}


@pytest.fixture
def raw(tiny_model_dir, tmp_path):
    cfg = base_config(tiny_model_dir, tmp_path / "data.jsonl", tmp_path / "out",
                      plugins=["tms_axolotl_plugin.TMSPlugin"],
                      vllm={"dtype": "float32", "gpu_memory_utilization": 0.8},
                      tms={"num_checkpoints": 2, "sidecar": {"transport": "tcp"}})
    return json.loads(json.dumps(cfg))


def fingerprints(raw, world_size=1, **kwargs):
    return stage_fingerprints(raw, data_inputs="rows", world_size=world_size,
                              student_inputs=[0, 1, 2], **kwargs)


def set_key(raw: dict, dotted: str, value) -> dict:
    changed = copy.deepcopy(raw)
    node = changed
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return changed


def changed_value(key: str, current, paths):
    if key in TMS_CHANGES:
        return TMS_CHANGES[key]
    if key in TMS_PATH_KEYS:
        return paths[key]
    if isinstance(current, bool):
        return not current
    if isinstance(current, (int, float)):
        return current + 1
    if isinstance(current, str):
        return current + "-changed"
    if isinstance(current, list):
        return current + [{"extra": 1}]
    if isinstance(current, dict):
        return {**current, "extra": 1}
    return "changed"


def reruns_after(raw, key, paths) -> set[str]:
    before = fingerprints(raw)
    value = changed_value(key, flat_config(raw).get(key), paths)
    after = fingerprints(set_key(raw, key, value))
    return {stage for stage in STAGES if before[stage] != after[stage]}


# `datasets` counts through the rows it yields, not its config value: the data-stage tests cover it.
ROWS = [(key, rule) for rule in RULES for key in rule.keys if rule.counted_as != "rows"]


@pytest.mark.parametrize("key,rule", ROWS, ids=[key for key, _ in ROWS])
def test_changing_a_key_reruns_exactly_the_stages_of_its_row(raw, paths, key, rule):
    assert reruns_after(raw, key, paths) == set(rule.reruns())


@pytest.mark.parametrize("key", ["learning_rate", "micro_batch_size",
                                 "gradient_accumulation_steps", "sample_packing", "num_epochs",
                                 "optimizer", "lora_r", "fsdp_config"])
def test_keys_in_no_row_rerun_harvest_and_student(raw, paths, key):
    assert rule_for(key) is DEFAULT_RULE
    assert reruns_after(raw, key, paths) == {"harvest", "generation", "student"}


def test_number_of_processes_reruns_harvest_and_student(raw):
    one, two = fingerprints(raw, world_size=1), fingerprints(raw, world_size=2)
    assert {s for s in STAGES if one[s] != two[s]} == {"harvest", "generation", "student"}


def test_checkpoints_from_harvest_from_still_key_the_student_on_training_settings(raw):
    base = fingerprints(raw, harvest="digest-of-checkpoints")
    lr = fingerprints(set_key(raw, "learning_rate", 0.5), harvest="digest-of-checkpoints")
    assert base["harvest"] == lr["harvest"] and base["student"] != lr["student"]


def test_an_explicit_default_equals_an_omitted_tms_key(raw):
    assert fingerprints(raw) == fingerprints(set_key(raw, "tms.alpha", 0.25))


def test_a_local_base_model_counts_by_content_not_path(raw, tiny_model_dir, tmp_path):
    copy_dir = tmp_path / "copied-model"
    shutil.copytree(tiny_model_dir, copy_dir)
    moved = set_key(raw, "base_model", str(copy_dir))
    assert fingerprints(moved) == fingerprints(raw)  # same files elsewhere: nothing reruns
    config = json.loads((copy_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy_dir / "config.json").write_text(json.dumps(config))
    assert fingerprints(moved)["data"] != fingerprints(raw)["data"]
    weights = copy_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a change in the weights' last bytes
    shutil.copytree(tiny_model_dir, tmp_path / "second", dirs_exist_ok=True)
    (tmp_path / "second" / "model.safetensors").write_bytes(bytes(data))
    assert fingerprints(set_key(raw, "base_model", str(tmp_path / "second")))["data"] != \
        fingerprints(raw)["data"]


def test_a_deepspeed_json_counts_by_content_not_path(raw, tmp_path):
    first, second = tmp_path / "a" / "zero2.json", tmp_path / "b" / "zero2.json"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    a, b = (fingerprints(set_key(raw, "deepspeed", str(p))) for p in (first, second))
    assert a == b
    second.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    c = fingerprints(set_key(raw, "deepspeed", str(second)))
    assert {s for s in STAGES if a[s] != c[s]} == {"harvest", "generation", "student"}


def test_every_tms_key_has_its_own_row():
    def leaves(model, prefix):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from leaves(annotation, f"{prefix}.{name}")
            else:
                yield f"{prefix}.{name}"

    missing = [key for key in leaves(TMSConfig, "tms") if rule_for(key) is DEFAULT_RULE]
    assert not missing, f"tms keys without a row in stage_inputs.RULES: {missing}"


def test_every_key_in_the_table_is_a_real_config_key():
    """A misspelt key in the table would silently fall back to the default rule."""
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.vllm import VllmConfig

    fields = AxolotlInputConfig.model_fields
    axolotl_keys = set(fields) | {f.alias for f in fields.values() if f.alias}
    vllm_keys = {f"vllm.{k}" for k in VllmConfig.model_fields}
    unknown = [key for rule in RULES for key in rule.keys
               if not key.startswith("tms.") and key not in axolotl_keys | vllm_keys]
    assert not unknown, f"not Axolotl 0.21 config keys: {unknown}"


def test_streamed_fingerprint_equals_the_one_of_the_whole_list():
    from tms_axolotl_plugin.fingerprint import canonical_json, fingerprint, fingerprint_of_items

    rows = [{"b": 1, "a": [1, {"z": None, "é": "ü\u2028"}]}, {"x": 2.5}, {}]
    rest = ([{"type": "chat_template"}], "{{ messages }}", 3)
    assert fingerprint_of_items(map(canonical_json, rows), *rest) == fingerprint(rows, *rest)
    assert fingerprint_of_items([], None) == fingerprint([], None)
