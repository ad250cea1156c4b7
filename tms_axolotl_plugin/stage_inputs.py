"""What decides each stage: one table from config keys to the stages they determine.

The four stages are named by fingerprints that chain, so a change reruns the stage it decides
and everything after it:

    data        the tokenized training rows and the held-out split
    harvest     the SFT run and its T checkpoints            (includes the data fingerprint)
    generation  the regenerated answers                      (includes the harvest fingerprint)
    student     the mixture and the student run              (includes the generation fingerprint)

`RULES` says, for each key Axolotl and the plugin know, which stages it decides directly; a key
that decides none (logging, save/eval cadence, engine memory, ...) can be changed without any
rerun. A key in no rule decides harvest and student: it may change the trained weights. The
number of processes (with micro batch and accumulation: the effective batch) decides harvest
and student too. Where a value names a local file or model folder, its content counts, not its
path. The README's table is generated from `RULES` (`python -m tms_axolotl_plugin.docs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tms_axolotl_plugin.fingerprint import content_digest, fingerprint
from tms_axolotl_plugin.generation import SAMPLING_PROTOCOL

STAGES = ("data", "harvest", "generation", "student")
Stage = Literal["data", "harvest", "generation", "student"]


@dataclass(frozen=True)
class KeyRule:
    keys: tuple[str, ...]  # dotted for nested `tms:` and `vllm:` keys
    decides: tuple[Stage, ...]  # the stages it enters directly; later ones follow by the chain
    why: str
    counted_as: Literal["value", "content", "rows"] = "value"
    # value: the setting itself; content: the file or folder it names (a plain value otherwise);
    # rows: not read from the config, the data stage hashes the rows and tokenization it yields.

    def reruns(self) -> tuple[Stage, ...]:
        """Every stage a change of this key reruns: what it decides and everything after."""
        if not self.decides:
            return ()
        first = min(STAGES.index(s) for s in self.decides)
        return STAGES[first:]


TRAINING = ("harvest", "student")

RULES: tuple[KeyRule, ...] = (
    # -- data -------------------------------------------------------------------------------
    KeyRule(("datasets",), ("data",), "the rows, and how each is tokenized (paths excluded: "
            "the content counts)", counted_as="rows"),
    KeyRule(("base_model", "base_model_config", "tokenizer_config"), ("data",),
            "the tokenizer and the starting weights (a local folder counts by content)",
            counted_as="content"),
    KeyRule(("chat_template_jinja",), ("data",), "the prompt format", counted_as="content"),
    KeyRule(("revision_of_model", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
             "special_tokens", "tokens", "added_tokens_overrides", "chat_template",
             "default_system_message", "sequence_len", "train_on_inputs"), ("data",),
            "how rows become prompt and answer tokens"),
    KeyRule(("val_set_size", "seed", "tms.pld.heldout_size", "tms.pld.enabled"), ("data",),
            "the held-out split (and, for `seed`, the shuffling of training)"),
    # -- harvest (and the student, which is trained the same way) ---------------------------
    KeyRule(("deepspeed",), TRAINING, "the training engine (a JSON file counts by content)",
            counted_as="content"),
    KeyRule(("lora_model_dir",), TRAINING, "the adapter training starts from",
            counted_as="content"),
    KeyRule(("tms.num_checkpoints", "tms.harvest_from"), ("harvest",),
            "which checkpoints are harvested"),
    # -- generation -------------------------------------------------------------------------
    KeyRule(("tms.generation.backend", "tms.generation.temperature", "tms.generation.top_p",
             "tms.generation.top_k", "tms.generation.min_p", "tms.generation.repetition_penalty",
             "tms.generation.presence_penalty", "tms.generation.frequency_penalty",
             "tms.generation.max_new_tokens", "vllm.dtype"), ("generation",),
            "how answers are sampled"),
    KeyRule(("tms.sidecar.extra_args", "tms.sidecar.env"), ("generation",),
            "server flags and variables can change sampling (quantization, KV-cache dtype)"),
    # -- student ----------------------------------------------------------------------------
    KeyRule(("tms.alpha", "tms.seed", "tms.schedule", "tms.student_init", "tms.turns",
             "tms.generation.all_checkpoints"), ("student",),
            "the mixture draws and where the student starts"),
    # -- none: change freely ----------------------------------------------------------------
    KeyRule(("output_dir", "dataset_prepared_path", "dataset_processes", "dataset_num_proc"),
            (), "where outputs and caches go, how many processes prepare data"),
    KeyRule(("wandb_project", "wandb_entity", "wandb_name", "wandb_run_id", "wandb_mode",
             "wandb_watch", "wandb_log_model", "use_wandb", "mlflow_tracking_uri",
             "mlflow_experiment_name", "mlflow_run_name", "hf_mlflow_log_artifacts",
             "use_mlflow", "comet_api_key", "comet_workspace", "comet_project_name",
             "comet_experiment_key", "comet_mode", "comet_online", "comet_experiment_config",
             "use_comet", "use_tensorboard", "logging_steps", "include_tokens_per_second"), (),
            "logging and reporters"),
    KeyRule(("eval_steps", "evals_per_epoch", "eval_strategy", "evaluation_strategy",
             "eval_batch_size", "eval_table_size", "eval_max_new_tokens", "do_causal_lm_eval",
             "eval_causal_lm_metrics", "save_steps", "saves_per_epoch", "save_strategy",
             "save_total_limit", "save_only_model", "save_safetensors", "save_first_step"), (),
            "eval and save cadence (the harvest keeps its own T checkpoints)"),
    KeyRule(("hub_model_id", "hub_strategy", "hub_revision", "push_dataset_to_hub",
             "resume_from_checkpoint", "auto_resume_from_checkpoints"), (),
            "publishing and resuming (the harvest never pushes nor inherits a resume path)"),
    KeyRule(("dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_pin_memory",
             "gradient_checkpointing", "gradient_checkpointing_kwargs"), (),
            "speed and memory only"),
    KeyRule(tuple(f"vllm.{key}" for key in (
        "gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "data_parallel_size",
        "enable_prefix_caching", "enforce_eager", "host", "port", "device")), (),
        "engine capacity, memory and placement"),
    KeyRule(("tms.generation.batch_size",) + tuple(f"tms.sidecar.{key}" for key in (
        "url", "urls", "transport", "host", "port", "allow_remote", "python", "cuda_visible_devices",
        "api_key", "startup_timeout_s", "request_timeout_s", "max_retries", "concurrency",
        "engines")), (),
        "where and how fast answers are generated (each answer has its own seed)"),
    KeyRule(tuple(f"tms.nodes.{key}" for key in ("probe_timeout_s", "heartbeat_s",
                                                 "dead_after_s")), (),
            "how nodes check on each other"),
    KeyRule(("tms.pld.eval_steps", "tms.pld.max_examples", "tms.pld.max_overhead")
            + tuple(f"tms.retention.{key}" for key in (
                "enabled", "prompts", "max_prompts", "max_new_tokens", "mc_path",
                "mc_max_questions")), (),
            "metrics only (a skipped stage keeps the metrics it logged)"),
)
DEFAULT_RULE = KeyRule(("any other key",), TRAINING, "may change the trained weights")
_BY_KEY = {key: rule for rule in RULES for key in rule.keys}
# Sections whose keys are looked up one by one; any other nested value counts as a whole.
_NESTED = ("tms", "vllm")


def rule_for(key: str) -> KeyRule:
    return _BY_KEY.get(key, DEFAULT_RULE)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and prefix not in _BY_KEY:  # `tms.sidecar.env` is one value
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def flat_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys as they are; `tms:` (with its defaults filled in, so an explicit default
    equals an omitted key) and `vllm:` by dotted leaf key."""
    from tms_axolotl_plugin.config import TMSConfig

    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "tms" and value is not None:
            value = TMSConfig.model_validate(dict(value)).model_dump(mode="json")
        if key in _NESTED and isinstance(value, dict):
            flat.update(_flatten(value, key))
        else:
            flat[key] = value
    return flat


def _counted(rule: KeyRule, value: Any) -> Any:
    if rule.counted_as == "content" and isinstance(value, str) and Path(value).exists():
        return {"content": content_digest(Path(value))}
    return value


def signature(raw: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """The settings of `raw` that decide `stage` directly, as they count in its fingerprint."""
    out = {}
    for key, value in flat_config(raw).items():
        rule = rule_for(key)
        if stage in rule.decides and rule.counted_as != "rows" and value is not None:
            out[key] = _counted(rule, value)
    return out


def stage_fingerprints(raw: dict[str, Any], *, data_inputs: Any, world_size: int,
                       harvest: str | None = None, harvest_run_id: str = "",
                       student_inputs: Any = None) -> dict[Stage, str]:
    """The chained fingerprints of the four stages. `data_inputs`: what the data stage hashes
    besides the config (rows, split); `harvest`: a fingerprint that replaces the harvest's own
    (checkpoints taken from `tms.harvest_from`); `harvest_run_id`: the id of the harvest's
    training (a harvest trained again gets new answers); `student_inputs`: the draws."""
    data = fingerprint(signature(raw, "data"), data_inputs)
    if harvest is None:
        harvest = fingerprint(signature(raw, "harvest"), world_size, data)
    # The protocol counts so that label stores of protocol 1 (unstated sampling fields filled
    # from the checkpoint's generation_config) are never reused. Adding the tms.generation
    # penalty/top_k/min_p keys changed every fingerprint too, but only because their defaults
    # are not None (a None value is left out of `signature`): that would not survive a default
    # of None, nor a later change of how requests are sampled that adds no key.
    generation = fingerprint(signature(raw, "generation"), harvest, harvest_run_id, data,
                             {"sampling_protocol": SAMPLING_PROTOCOL})
    student = fingerprint(signature(raw, "student"), world_size, generation, student_inputs)
    return {"data": data, "harvest": harvest, "generation": generation, "student": student}


def markdown_table() -> str:
    rows = ["| keys | decides | reruns | why |", "|---|---|---|---|"]
    for rule in (*RULES, DEFAULT_RULE):
        keys = ", ".join(f"`{k}`" for k in rule.keys) if rule is not DEFAULT_RULE \
            else "any other Axolotl key"
        if rule.counted_as == "content":
            keys += " (by content)"
        decides = ", ".join(rule.decides) or "nothing"
        reruns = ", ".join(rule.reruns()) or "-"
        rows.append(f"| {keys} | {decides} | {reruns} | {rule.why} |")
    rows.append("| number of processes (`WORLD_SIZE`) | harvest, student | harvest, generation, "
                "student | with micro batch and accumulation, the effective batch |")
    return "\n".join(rows)
