"""Which dataset types and run kinds TMS supports: one decision table, checked at config load.

TMS regenerates the trained answer of every training row, so it must find that answer in the
raw row and write a new one back, which Axolotl's same prompt strategy then tokenizes again.
That is possible for three shapes of data:

    chat_template   the trained turns of a conversation (`field_messages`)
    field           one row field that is exactly the trained span (the alpaca family, the
                    dict-format user-defined type and a few single-answer strategies)
    segments        `input_output` rows: the segments with `label: true`

Every other `type:` (and every run that is not text SFT: multimodal, pretraining, diffusion,
remote training, reward models, streaming) is rejected when Axolotl validates the YAML, with a
message naming the key, the value and what is supported. The README's tables are generated from
the same rows (`markdown_table`). Plain Python: no Axolotl import, so it runs inside pydantic
validation and in unit tests alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tms_axolotl_plugin.errors import TMSConfigError
from tms_axolotl_plugin.sharding import check_harvest_sharding

Kind = Literal["chat_template", "field", "segments"]


@dataclass(frozen=True)
class SupportedType:
    spellings: tuple[str, ...]  # `type:` values, exactly as written in the YAML
    kind: Kind
    answer: str  # the row field (kind "field") or where the answers sit, for the docs
    why: str


@dataclass(frozen=True)
class RejectedType:
    names: tuple[str, ...]  # `type:` values; a trailing `*` matches any suffix
    why: str
    instead: str


@dataclass(frozen=True)
class RejectedRunKind:
    key: str  # the config key, as the user writes it
    marks: str  # what it marks, for the message and the docs
    why: str


ALPACA_STYLES = ("instruct", "chat", "chatml", "phi")  # axolotl.prompters.PromptStyle values

# Spellings Axolotl 0.21 resolves: `name` -> prompt_strategies.<name>.load, `name.load_x` ->
# its load_x; `alpaca[:style]` has no module and goes to the DATASET_HANDLERS table with the
# style after the colon. A trained span "is exactly the field" when the strategy tokenizes that
# field alone (BOS stripped, EOS appended) after a prompt built only from the other fields.
SUPPORTED_TYPES: tuple[SupportedType, ...] = (
    SupportedType(
        ("chat_template", "chat_template.load"), "chat_template",
        "every trained turn in `field_messages`",
        "Axolotl's chat-template strategy marks each trained turn; the plugin rewrites that "
        "message's content",
    ),
    SupportedType(
        ("alpaca", *(f"alpaca:{style}" for style in ALPACA_STYLES)), "field", "output",
        "`AlpacaPromptTokenizingStrategy` trains exactly `output` after the "
        "instruction/input prompt (styles of `AlpacaPrompter`)",
    ),
    SupportedType(
        ("alpaca_instruct", "alpaca_instruct.load", "alpaca_instruct.load_no_prompt"),
        "field", "output", "the alpaca strategy with the instruct style (or no system prompt)",
    ),
    SupportedType(
        ("alpaca_chat", "alpaca_chat.load", "alpaca_chat.load_concise",
         "alpaca_chat.load_no_prompt"),
        "field", "output", "the alpaca strategy with the chat style (or the dataset's "
        "`conversation` style)",
    ),
    SupportedType(
        ("alpaca_chat.load_qa",), "field", "answer",
        "prompt from `question`, trained span exactly `answer`",
    ),
    SupportedType(
        ("alpaca_chat.load_camel_ai",), "field", "message_2",
        "prompt from `message_1`, trained span exactly `message_2`",
    ),
    SupportedType(
        ("alpaca_w_system", "alpaca_w_system.load", "alpaca_w_system.load_instruct",
         "alpaca_w_system.load_chat"),
        "field", "output", "prompt from `system`, `instruction`, `input`; trained span "
        "exactly `output`",
    ),
    SupportedType(
        ("alpaca_w_system.load_open_orca", "alpaca_w_system.load_open_orca_chatml",
         "orcamini"),
        "field", "response", "prompt from `system_prompt` and `question`; trained span "
        "exactly `response`",
    ),
    SupportedType(
        ("context_qa", "context_qa.load"), "field", "answer",
        "prompt from `article` and `question`; trained span exactly `answer`",
    ),
    SupportedType(
        ("creative_acr.load_answer",), "field", "revision",
        "prompt from `instruction`; trained span exactly `revision`",
    ),
    SupportedType(
        ("metharme",), "field", "generation",
        "prompt is the `prompt` field; trained span exactly `generation` (followed by up "
        "to three EOS tokens, added again when the new answer is tokenized)",
    ),
    SupportedType(
        ("{field_instruction: ..., field_output: ..., format: ..., no_input_format: ...}",),
        "field", "`field_output` (default `output`)",
        "Axolotl's user-defined strategy trains exactly `field_output` after the formatted "
        "prompt",
    ),
    SupportedType(
        ("input_output",), "segments", "the `segments` with `label: true`",
        "the strategy tokenizes segment by segment, so each trained segment is one answer",
    ),
)
_SUPPORTED_BY_SPELLING = {
    spelling: row for row in SUPPORTED_TYPES for spelling in row.spellings
    if not spelling.startswith("{")
}
_USER_DEFINED = next(row for row in SUPPORTED_TYPES if row.spellings[0].startswith("{"))
USER_DEFINED_DEFAULTS = {  # axolotl.prompt_strategies.user_defined.UserDefinedDatasetConfig
    "field_system": "system", "field_instruction": "instruction", "field_input": "input",
    "field_output": "output",
}

_CONVERT = "convert the rows to `chat_template` (messages) or `alpaca` (instruction/input/output)"
REJECTED_TYPES: tuple[RejectedType, ...] = (
    RejectedType(
        ("completion", "completion.*"),
        "trains every token of the text field: there is no prompt to answer and no answer to "
        "replace", _CONVERT,
    ),
    RejectedType(
        ("pretrain", "pretrain.*"), "pretraining text: every token is trained, nothing is an "
        "answer", _CONVERT,
    ),
    RejectedType(
        ("(missing)",),
        "without a type, Axolotl uses rows that have `input_ids`/`attention_mask`/`labels` as "
        "they are (pre-tokenized) and fails on text rows; TMS needs the answer as text to "
        "replace it", "give the untokenized rows a supported `type`",
    ),
    RejectedType(
        ("stepwise_supervised", "stepwise_supervised.*", "bradley_terry.*"),
        "reward-model data (per-step labels, chosen/rejected pairs), not answers to imitate",
        "TMS trains SFT models only; use Axolotl without `tms:`",
    ),
    RejectedType(
        ("dpo.*", "ipo.*", "kto.*", "orpo.*", "ebft.*", "axolotl.integrations.kd.*"),
        "preference, RL or distillation data (and run kinds), not supervised answers",
        "TMS trains SFT models only; use Axolotl without `tms:`",
    ),
    RejectedType(
        ("messages", "messages.*"),
        "wraps the whole dataset (`DatasetWrappingStrategy`) instead of tokenizing row by row, "
        "so the plugin cannot split a row into prompt and answer",
        "use `type: chat_template` on the same rows",
    ),
    RejectedType(
        ("llama2_chat", "llama2_chat.*", "pygmalion", "pygmalion.*"),
        "multi-turn conversations formatted by the strategy's own code, not by a chat template "
        "whose turns the plugin can locate", "use `type: chat_template` on the conversations",
    ),
    RejectedType(
        ("context_qa.load_v2", "context_qa.load_404"),
        "the trained text is not a row field (`load_v2` trains \"Answer: \" + answer, "
        "`load_404` a fixed refusal)", _CONVERT,
    ),
    RejectedType(
        ("creative_acr.load_critique", "creative_acr.load_revise"),
        "the trained text is assembled from several fields (scores, critiques, revision)",
        _CONVERT,
    ),
    RejectedType(
        ("jeopardy", "jeopardy:*"),
        "trains \"what is \" + `answer`, not a row field as it stands", _CONVERT,
    ),
    RejectedType(
        ("explainchoice", "explainchoice:*", "concisechoice", "concisechoice:*"),
        "the trained field is `solution` in some rows and `explanation` in others", _CONVERT,
    ),
    RejectedType(
        ("reflection", "reflection:*"),
        "three fields are trained (`output`, `reflection`, `corrected`)", _CONVERT,
    ),
    RejectedType(
        ("oasst", "oasst:*", "gpteacher", "gpteacher:*", "summarizetldr", "summarizetldr:*"),
        "one answer field each (`RESPONSE`, `response`, `summary`), but Axolotl builds these "
        "strategies outside its prompt-strategy loader, which the plugin tokenizes rows with",
        "rename the fields to alpaca's (instruction/input/output) and use `type: alpaca`",
    ),
    RejectedType(
        ("sharegpt*",), "removed from Axolotl (it rejects it too)",
        "use `type: chat_template`",
    ),
    RejectedType(
        ("user_defined", "user_defined.*"),
        "the string form has no field settings (Axolotl expects the dict form)",
        "write `type:` as a mapping with `field_instruction`, `field_output`, `format`, ...",
    ),
    RejectedType(
        ("_synthetic",), "synthetic token ids, no text", "use real rows of a supported type",
    ),
    RejectedType(
        ("chat_template.*", "chat_template:*"),
        "Axolotl 0.21 has no strategy under this name (training would fail with \"unhandled "
        "prompt tokenization strategy\")",
        "write `type: chat_template` and choose the template with `chat_template:`",
    ),
    RejectedType(
        ("alpaca:*",), f"not an `AlpacaPrompter` style ({', '.join(ALPACA_STYLES)})",
        "use one of those styles, e.g. `alpaca:chatml`",
    ),
    RejectedType(
        ("*",),
        "any other strategy (another `load_*` variant, a full module path, a third-party "
        "`pkg.module`): the plugin cannot know which part of a row is the trained answer",
        _CONVERT + " (in-tree strategies by their short name, e.g. `chat_template`)",
    ),
)

TMS_SFT_ONLY = "TMS supports text SFT only (causal LM, `datasets:` of a supported type)"
REJECTED_RUN_KINDS: tuple[RejectedRunKind, ...] = (
    RejectedRunKind(
        "processor_type", "a multimodal processor",
        "the plugin builds text-only prompts; images/audio would be dropped from regeneration",
    ),
    RejectedRunKind(
        "skip_prepare_dataset", "rows tokenized on the fly (multimodal and custom collators)",
        "the plugin regenerates from Axolotl's prepared (tokenized) rows",
    ),
    RejectedRunKind(
        "pretraining_dataset", "streamed pretraining",
        "pretraining text has no prompt/answer split",
    ),
    RejectedRunKind(
        "streaming", "datasets read as a stream",
        "TMS regenerates every row before the student trains and draws targets per epoch; a "
        "stream has neither a fixed row set nor epochs",
    ),
    RejectedRunKind(
        "diffusion_lm", "diffusion language-model training",
        "TMS samples answers autoregressively from causal-LM checkpoints",
    ),
    RejectedRunKind(
        "diffusion", "diffusion training (`axolotl.integrations.diffusion`)",
        "TMS samples answers autoregressively from causal-LM checkpoints",
    ),
    RejectedRunKind(
        "diffusion_decision", "diffusion decision training "
        "(`axolotl.integrations.diffusion_decision`)",
        "TMS samples answers autoregressively from causal-LM checkpoints",
    ),
    RejectedRunKind(
        "hatchery", "remote training through the Hatchery/Tinker API "
        "(`axolotl.integrations.hatchery`)",
        "TMS needs the harvested checkpoints on local disk to generate from them",
    ),
    RejectedRunKind(
        "reward_model", "reward-model training", "a reward model has no answers to regenerate",
    ),
    RejectedRunKind(
        "process_reward_model", "process-reward-model training",
        "a reward model has no answers to regenerate",
    ),
)
# Plugins that turn a config into one of the run kinds above even before their key is set.
REJECTED_PLUGINS = {
    "axolotl.integrations.diffusion": "diffusion",
    "axolotl.integrations.diffusion_decision": "diffusion_decision",
    "axolotl.integrations.hatchery": "hatchery",
}


def _get(entry: Any, key: str) -> Any:
    """`key` of a raw dict, a DictDefault or a pydantic model (Axolotl's validated entries)."""
    if isinstance(entry, Mapping):
        return entry.get(key)
    return getattr(entry, key, None)


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return {}


def _is_dict_type(ds_type: Any) -> bool:
    return isinstance(ds_type, Mapping) or hasattr(ds_type, "model_dump")


def _matches(pattern: str, value: str) -> bool:
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern


def rejection_of(ds_type: Any) -> RejectedType | None:
    """The rejected-table row for a `type:` value, or None when the type is supported."""
    if ds_type is None:
        return next(row for row in REJECTED_TYPES if row.names == ("(missing)",))
    if _is_dict_type(ds_type) or isinstance(ds_type, str) and ds_type in _SUPPORTED_BY_SPELLING:
        return None
    value = ds_type if isinstance(ds_type, str) else repr(ds_type)
    return next(row for row in REJECTED_TYPES if any(_matches(p, value) for p in row.names))


def supported_summary() -> str:
    """Every supported spelling, grouped by strategy: `alpaca_chat[.load|.load_qa|...]`."""
    groups: dict[str, list[str]] = {}
    for spelling in _SUPPORTED_BY_SPELLING:
        base = spelling.split(":")[0].split(".")[0]
        groups.setdefault(base, []).append(spelling)
    parts = []
    for base, spellings in groups.items():
        if base in spellings:
            variants = [s[len(base):] for s in spellings if s != base]
            parts.append(base + (f"[{'|'.join(variants)}]" if variants else ""))
        else:
            parts += spellings
    return (", ".join(parts) + ", or a dict type "
            "(`{field_instruction, field_input, field_output, format, no_input_format, ...}`)")


def _user_defined_fields(ds_type: Any) -> dict[str, str]:
    given = {k: v for k, v in _as_dict(ds_type).items() if v is not None}
    return {key: given.get(key) or default for key, default in USER_DEFINED_DEFAULTS.items()}


def supported_type(ds_cfg: Any) -> SupportedType:
    """The decision-table row of one `datasets:` entry; TMSConfigError if it is not supported."""
    ds_type = _get(ds_cfg, "type")
    if _is_dict_type(ds_type):
        return _USER_DEFINED
    rejected = rejection_of(ds_type)
    if rejected is not None:
        raise TMSConfigError(_type_message(None, ds_type, rejected))
    return _SUPPORTED_BY_SPELLING[ds_type]


def dataset_kind(ds_cfg: Any) -> Kind:
    """How the plugin finds and rewrites the answer of this entry's rows."""
    return supported_type(ds_cfg).kind


def answer_field(ds_cfg: Any) -> str:
    """The row field that holds the trained answer, for the single-field types."""
    row = supported_type(ds_cfg)
    if row.kind != "field":
        raise TMSConfigError(
            f"type {_get(ds_cfg, 'type')!r} has no single answer field (its answers are "
            f"{row.answer})"
        )
    ds_type = _get(ds_cfg, "type")
    if row is _USER_DEFINED:
        return _user_defined_fields(ds_type)["field_output"]
    return row.answer


def _type_message(where: str | None, ds_type: Any, rejected: RejectedType) -> str:
    shown = "missing" if ds_type is None else f"{ds_type!r}"
    label = f"{where}.type" if where else "the dataset's type"
    return (
        f"{label} is {shown}: {rejected.why}. TMS can regenerate answers only for the "
        f"types {supported_summary()}. Instead: {rejected.instead}."
    )


def check_datasets(datasets: Any) -> None:
    """Every `datasets:` entry has a supported type and no row subsampling."""
    for index, ds_cfg in enumerate(datasets or []):
        where = f"datasets[{index}]"
        ds_type = _get(ds_cfg, "type")
        rejected = rejection_of(ds_type)
        if rejected is not None:
            raise TMSConfigError(_type_message(where, ds_type, rejected))
        if _is_dict_type(ds_type):
            fields = _user_defined_fields(ds_type)
            clash = [k for k in ("field_instruction", "field_input", "field_system")
                     if fields[k] == fields["field_output"]]
            if clash:
                raise TMSConfigError(
                    f"{where}.type.field_output is {fields['field_output']!r}, the same field "
                    f"as {clash[0]}: a new answer written there would change the prompt too. "
                    "Use a separate answer field."
                )
        for key in ("shards", "weight"):
            if _get(ds_cfg, key) not in (None, 1, 1.0):
                raise TMSConfigError(
                    f"{where}.{key} is not supported with `tms:` (it is "
                    f"{_get(ds_cfg, key)!r}); subsample the data file instead"
                )


def _plugin_names(config: Mapping[str, Any]) -> list[str]:
    plugins = config.get("plugins") or []
    return [str(p) for p in plugins] if isinstance(plugins, (list, tuple)) else [str(plugins)]


def check_run_kind(config: Mapping[str, Any]) -> None:
    """The run is text SFT: no multimodal, pretraining, diffusion, remote or reward-model run."""
    for kind in REJECTED_RUN_KINDS:
        value = config.get(kind.key)
        if value is None or value is False:  # an empty block (`diffusion_lm: {}`) enables it
            continue
        shown = "{...}" if isinstance(value, Mapping) else value
        raise TMSConfigError(
            f"`{kind.key}: {shown}` marks {kind.marks}, which `tms:` cannot run: {kind.why}. "
            f"{TMS_SFT_ONLY}; remove `{kind.key}` (or the `tms:` block)."
        )
    for plugin in _plugin_names(config):
        for prefix, key in REJECTED_PLUGINS.items():
            if plugin.startswith((prefix + ".", prefix + ":")):
                kind = next(k for k in REJECTED_RUN_KINDS if k.key == key)
                raise TMSConfigError(
                    f"plugin `{plugin}` runs {kind.marks}, which `tms:` cannot run: "
                    f"{kind.why}. {TMS_SFT_ONLY}; remove the plugin (or the `tms:` block)."
                )


def check_training_settings(config: Mapping[str, Any], harvest_child: bool = False) -> None:
    """Settings the method needs: a separable prompt, its own held-out split, whole epochs."""
    if config.get("train_on_inputs"):
        raise TMSConfigError(
            "`train_on_inputs: true` trains the prompt too, so TMS cannot tell prompt from "
            "answer; set it to false")
    if config.get("test_datasets") and not harvest_child:  # the harvest gets the plugin's own
        raise TMSConfigError(
            "`test_datasets` is not supported with `tms:`: the plugin holds out its own split "
            "(`val_set_size` or `tms.pld.heldout_size`) so that the harvest and student runs "
            "are evaluated on the same examples; remove `test_datasets`")
    epochs = config.get("num_epochs") or 1
    if float(epochs) != int(float(epochs)):
        raise TMSConfigError(f"TMS needs a whole number of epochs (the student's targets are "
                             f"drawn per epoch); num_epochs is {epochs}")


def check_config(config: Mapping[str, Any], harvest_child: bool = False) -> None:
    """Everything about a config's run kind, datasets and training settings that TMS must
    support. `harvest_child`: the config of the plugin's own harvest run."""
    check_run_kind(config)
    check_datasets(config.get("datasets"))
    check_training_settings(config, harvest_child)
    check_harvest_sharding(config)
    if not harvest_child:  # the harvest does not regenerate
        check_regeneration_layout(config)


def check_regeneration_layout(config: Mapping[str, Any]) -> None:
    """The vLLM engines this launch would run during regeneration fit its nodes
    (`regenerate.check_engine_layout`); a `tms` block that does not validate is left to the
    field's own validation, which reports it."""
    from pydantic import ValidationError

    from tms_axolotl_plugin import nodes, ranks
    from tms_axolotl_plugin.config import TMSConfig
    from tms_axolotl_plugin.regenerate import check_engine_layout

    block = config.get("tms")
    try:
        tms = block if isinstance(block, TMSConfig) else TMSConfig.model_validate(dict(block))
    except (ValidationError, TypeError, ValueError):
        return
    check_engine_layout(tms, config.get("vllm"), ranks.world_size(), nodes.local_world_size())


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """README tables: supported types, rejected types, rejected run kinds."""
    rows = ["| `type` | answer the plugin rewrites | why |", "|---|---|---|"]
    for row in SUPPORTED_TYPES:
        spellings = ", ".join(f"`{s}`" for s in row.spellings)
        answer = row.answer if row.kind != "field" or row.answer.startswith("`") \
            else f"`{row.answer}`"
        rows.append(f"| {_escape(spellings)} | {answer} | {_escape(row.why)} |")
    rows += ["", "| rejected `type` | why | instead |", "|---|---|---|"]
    for row in REJECTED_TYPES:
        names = ", ".join("no `type`" if n == "(missing)" else "anything else" if n == "*"
                          else f"`{n}`" for n in row.names)
        rows.append(f"| {names} | {_escape(row.why)} | {_escape(row.instead)} |")
    rows += ["", "| rejected run kind (key) | marks | why |", "|---|---|---|"]
    for kind in REJECTED_RUN_KINDS:
        plugins = [p for p, key in REJECTED_PLUGINS.items() if key == kind.key]
        key = f"`{kind.key}`" + "".join(f", plugin `{p}.*`" for p in plugins)
        rows.append(f"| {key} | {_escape(kind.marks)} | {_escape(kind.why)} |")
    return "\n".join(rows)
