"""Which dataset types and run kinds TMS accepts (dataset_support.py): every supported spelling
passes, every other type or run kind is rejected with a message naming the key, the value and
what is supported, the answer fields in the table are the spans Axolotl's own strategies train,
and the checks run when Axolotl loads the YAML."""

from __future__ import annotations

import pytest

from conftest import base_config, write_config
from tms_axolotl_plugin import dataset_support
from tms_axolotl_plugin.dataset_support import (
    REJECTED_TYPES,
    SUPPORTED_TYPES,
    answer_field,
    check_config,
    check_datasets,
    check_run_kind,
    dataset_kind,
    rejection_of,
)
from tms_axolotl_plugin.errors import TMSConfigError

SPELLINGS = [s for row in SUPPORTED_TYPES for s in row.spellings if not s.startswith("{")]
USER_DEFINED = {"field_instruction": "question", "field_output": "reply",
                "format": "Q: {instruction}\n{input}\nA: ",
                "no_input_format": "Q: {instruction}\nA: "}
SUPPORTED_LIST = "chat_template[.load], alpaca[:instruct|:chat|:chatml|:phi]"


# ---- supported types -----------------------------------------------------------------------


@pytest.mark.parametrize("ds_type", [*SPELLINGS, USER_DEFINED, {}])
def test_every_supported_spelling_is_accepted(ds_type):
    check_datasets([{"path": "data.jsonl", "type": ds_type}])


def test_supported_types_are_accepted_as_axolotls_validated_entries():
    """Inside config validation the entries are SFTDataset models (the dict type a model too)."""
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import SFTDataset

    entries = [SFTDataset(path="a.jsonl", type="alpaca_chat.load_qa"),
               SFTDataset(path="b.jsonl", type=USER_DEFINED),
               DictDefault({"path": "c.jsonl", "type": DictDefault(USER_DEFINED)})]
    check_datasets(entries)
    assert [answer_field(e) for e in entries] == ["answer", "reply", "reply"]


@pytest.mark.parametrize("ds_type,field", [
    ("alpaca", "output"), ("alpaca:chatml", "output"), ("alpaca_instruct.load_no_prompt", "output"),
    ("alpaca_chat", "output"), ("alpaca_chat.load_qa", "answer"),
    ("alpaca_chat.load_camel_ai", "message_2"), ("alpaca_w_system.load_instruct", "output"),
    ("alpaca_w_system.load_open_orca", "response"), ("orcamini", "response"),
    ("context_qa", "answer"), ("creative_acr.load_answer", "revision"),
    ("metharme", "generation"), (USER_DEFINED, "reply"), ({"format": "{instruction} "}, "output"),
])
def test_answer_field_names_the_row_field_that_holds_the_trained_answer(ds_type, field):
    assert dataset_kind({"type": ds_type}) == "field"
    assert answer_field({"type": ds_type}) == field


@pytest.mark.parametrize("ds_type,kind", [("chat_template", "chat_template"),
                                          ("input_output", "segments")])
def test_answer_field_raises_for_types_without_a_single_field(ds_type, kind):
    assert dataset_kind({"type": ds_type}) == kind
    with pytest.raises(TMSConfigError, match="no single answer field"):
        answer_field({"type": ds_type})


def test_answer_field_raises_for_a_rejected_type():
    with pytest.raises(TMSConfigError, match="type is 'completion'.*chat_template"):
        answer_field({"type": "completion"})


ROW = {
    "instruction": "Add two and three.", "input": "Use digits.", "system": "Be brief.",
    "question": "What is two plus three?", "system_prompt": "You are exact.",
    "article": "Two plus three is a sum.", "message_1": "Add two and three.",
    "prompt": "<|user|>Add two and three.<|model|>",
}
ANSWER, NEW_ANSWER = "The sum is 5.", "Five, I think."
FIELD_SPELLINGS = [s for row in SUPPORTED_TYPES if row.kind == "field" for s in row.spellings
                   if not s.startswith("{")] + ["user_defined"]


def axolotl_strategy(ds_type, tokenizer):
    """The strategy Axolotl builds for `ds_type` (`alpaca[:style]` via its DATASET_HANDLERS)."""
    from axolotl.prompt_strategies import load
    from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
    from axolotl.prompters import AlpacaPrompter
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"train_on_inputs": False, "sequence_len": 256})
    if ds_type == "user_defined":
        return load("user_defined", tokenizer, cfg, dict(USER_DEFINED))
    if ds_type.split(":")[0] == "alpaca":
        style = ds_type.split(":")[1] if ":" in ds_type else None
        return AlpacaPromptTokenizingStrategy(AlpacaPrompter(style), tokenizer, False, 256)
    return load(ds_type, tokenizer, cfg, DictDefault({"type": ds_type}))


@pytest.mark.parametrize("ds_type", FIELD_SPELLINGS)
def test_the_answer_field_is_exactly_the_span_axolotl_trains(ds_type, tiny_model_dir):
    """Checked against Axolotl's own strategies: the trained tokens are the field's text (and
    EOS), and a new answer written into the field changes the trained span, never the prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    strategy = axolotl_strategy(ds_type, tokenizer)
    field = answer_field({"type": USER_DEFINED if ds_type == "user_defined" else ds_type})

    def prompt_and_answer(answer):
        tokens = strategy.tokenize_prompt({**ROW, field: answer})
        trained = [i for i, label in enumerate(tokens["labels"]) if label != -100]
        assert trained == list(range(trained[0], len(tokens["labels"])))  # one span, at the end
        answer_ids = [t for t in tokens["input_ids"][trained[0]:] if t != tokenizer.eos_token_id]
        return tokens["input_ids"][:trained[0]], tokenizer.decode(answer_ids)

    prompt, answer = prompt_and_answer(ANSWER)
    new_prompt, new_answer = prompt_and_answer(NEW_ANSWER)
    assert (answer, new_answer) == (ANSWER, NEW_ANSWER)
    assert new_prompt == prompt


# ---- rejected types ------------------------------------------------------------------------

REJECTED = [
    ("completion", "no prompt to answer"),
    ("pretrain", "every token is trained"),
    (None, "pre-tokenized"),
    ("stepwise_supervised", "reward-model data"),
    ("bradley_terry.chat_template", "reward-model data"),
    ("dpo.chat_template", "preference, RL or distillation"),
    ("axolotl.integrations.kd.chat_template", "preference, RL or distillation"),
    ("messages", "DatasetWrappingStrategy"),
    ("llama2_chat", "strategy's own code"),
    ("pygmalion", "strategy's own code"),
    ("context_qa.load_v2", "not a row field"),
    ("context_qa.load_404", "not a row field"),
    ("creative_acr.load_critique", "assembled from several fields"),
    ("creative_acr.load_revise", "assembled from several fields"),
    ("jeopardy", "\"what is \""),
    ("explainchoice", "`solution` in some rows"),
    ("concisechoice:chat", "`solution` in some rows"),
    ("reflection", "three fields are trained"),
    ("oasst", "outside its prompt-strategy loader"),
    ("gpteacher", "outside its prompt-strategy loader"),
    ("summarizetldr", "outside its prompt-strategy loader"),
    ("sharegpt", "removed from Axolotl"),
    ("sharegpt.load_role", "removed from Axolotl"),
    ("user_defined", "dict form"),
    ("_synthetic", "synthetic token ids"),
    ("chat_template.default", "unhandled prompt tokenization strategy"),
    ("chat_template:chatml", "unhandled prompt tokenization strategy"),
    ("alpaca:vicuna", "not an `AlpacaPrompter` style"),
    ("alpaca.load", "cannot know which part of a row"),
    ("alpaca_chat.load_nope", "cannot know which part of a row"),
    ("axolotl.prompt_strategies.chat_template", "full module path"),
    ("my_pkg.strategies", "third-party"),
]


@pytest.mark.parametrize("ds_type,why", REJECTED, ids=[str(t) for t, _ in REJECTED])
def test_rejected_type_names_the_key_the_value_and_what_is_supported(ds_type, why):
    with pytest.raises(TMSConfigError) as excinfo:
        check_datasets([{"type": "chat_template"}, {"path": "x.jsonl", "type": ds_type}])
    message = str(excinfo.value)
    shown = "missing" if ds_type is None else repr(ds_type)
    for fragment in (f"datasets[1].type is {shown}", why, SUPPORTED_LIST, "Instead: "):
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_every_rejected_row_is_reached_by_its_own_names():
    """The table is checked in order: no row is shadowed by an earlier one."""
    for row in REJECTED_TYPES:
        for name in row.names:
            value = None if name == "(missing)" else name.replace("*", "x")
            assert rejection_of(value) is row, name


@pytest.mark.parametrize("key,value", [("shards", 4), ("weight", 0.5)])
def test_row_subsampling_is_rejected(key, value):
    with pytest.raises(TMSConfigError, match=rf"datasets\[0\]\.{key} is not supported .*"
                                             r"subsample the data file instead"):
        check_datasets([{"type": "alpaca", key: value}])


def test_no_subsampling_values_are_accepted():
    check_datasets([{"type": "alpaca", "shards": 1, "weight": 1.0}])


def test_user_defined_answer_field_must_not_be_a_prompt_field():
    with pytest.raises(TMSConfigError, match=r"datasets\[0\]\.type\.field_output is 'text', "
                                             r"the same field as field_instruction"):
        check_datasets([{"type": {"field_instruction": "text", "field_output": "text"}}])


# ---- run kinds -----------------------------------------------------------------------------

RUN_KINDS = [
    ({"processor_type": "AutoProcessor"}, "processor_type: AutoProcessor", "multimodal"),
    ({"skip_prepare_dataset": True}, "skip_prepare_dataset: True", "prepared"),
    ({"pretraining_dataset": [{"path": "c4"}]}, "pretraining_dataset", "pretraining"),
    ({"streaming": True}, "streaming: True", "per epoch"),
    ({"diffusion_lm": {}}, "diffusion_lm: {...}", "autoregressively"),
    ({"diffusion": {"noise_schedule": "cosine"}}, "diffusion: {...}", "autoregressively"),
    ({"diffusion_decision": {"layout": "thought_block"}}, "diffusion_decision", "diffusion"),
    ({"hatchery": {"backend": "tinker"}}, "hatchery: {...}", "local disk"),
    ({"reward_model": True}, "reward_model: True", "reward model"),
    ({"process_reward_model": True}, "process_reward_model: True", "reward model"),
    ({"plugins": ["axolotl.integrations.diffusion.DiffusionPlugin"]},
     "plugin `axolotl.integrations.diffusion.DiffusionPlugin`", "autoregressively"),
    ({"plugins": ["axolotl.integrations.hatchery.HatcheryPlugin"]},
     "plugin `axolotl.integrations.hatchery.HatcheryPlugin`", "local disk"),
    ({"plugins": ["axolotl.integrations.diffusion_decision:DiffusionDecisionPlugin"]},
     "diffusion_decision", "autoregressively"),
]


@pytest.mark.parametrize("config,names,why", RUN_KINDS, ids=[n for _, n, _ in RUN_KINDS])
def test_run_kind_that_is_not_text_sft_is_rejected_naming_the_key(config, names, why):
    with pytest.raises(TMSConfigError) as excinfo:
        check_run_kind({"datasets": [{"type": "chat_template"}], **config})
    message = str(excinfo.value)
    for fragment in (names, why, "TMS supports text SFT only"):
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_text_sft_run_kinds_are_accepted():
    check_config({
        "datasets": [{"type": "chat_template"}], "skip_prepare_dataset": False,
        "streaming": False, "reward_model": False, "processor_type": None,
        "plugins": ["tms_axolotl_plugin.TMSPlugin",
                    "axolotl.integrations.liger.LigerPlugin"],
    })


def test_check_config_checks_datasets_too():
    with pytest.raises(TMSConfigError, match=r"datasets\[0\]\.type is 'completion'"):
        check_config({"datasets": [{"type": "completion"}]})


def test_readme_table_lists_every_supported_spelling_and_rejected_run_kind():
    table = dataset_support.markdown_table()
    for spelling in SPELLINGS:
        assert f"`{spelling}`" in table
    for kind in dataset_support.REJECTED_RUN_KINDS:
        assert f"`{kind.key}`" in table


# ---- through Axolotl's real config loading -------------------------------------------------


def load(tmp_path, cfg):
    from axolotl.cli.config import load_cfg

    return load_cfg(str(write_config(tmp_path / "cfg.yml", cfg)))


@pytest.fixture
def tms_cfg(tmp_path, tiny_model_dir, small_chat_dataset):
    def make(**overrides):
        cfg = base_config(tiny_model_dir, small_chat_dataset, tmp_path / "out", **overrides)
        cfg["plugins"] = ["tms_axolotl_plugin.TMSPlugin"]
        cfg["tms"] = {}
        return cfg

    return make


@pytest.mark.parametrize("change,expected", [
    ({"processor_type": "AutoProcessor"},
     ["`processor_type: AutoProcessor` marks a multimodal processor", "text SFT only"]),
    ({"datasets": [{"path": "x.jsonl", "ds_type": "json", "type": "completion"}]},
     ["datasets[0].type is 'completion'", SUPPORTED_LIST]),
    ({"skip_prepare_dataset": True}, ["`skip_prepare_dataset: True`", "text SFT only"]),
    ({"train_on_inputs": True}, ["`train_on_inputs: true`", "set it to false"]),
    ({"num_epochs": 1.5}, ["whole number of epochs", "num_epochs is 1.5"]),
    ({"test_datasets": [{"path": "t.jsonl", "ds_type": "json", "type": "chat_template",
                         "split": "train"}]},
     ["`test_datasets` is not supported", "remove `test_datasets`"]),
], ids=["processor_type", "completion", "skip_prepare_dataset", "train_on_inputs",
        "fractional_epochs", "test_datasets"])
def test_unsupported_config_is_rejected_when_axolotl_loads_it(tmp_path, tms_cfg, change,
                                                              expected):
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, tms_cfg(**change))
    message = str(excinfo.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_supported_types_load_through_axolotl_and_plain_axolotl_is_untouched(tmp_path, tms_cfg):
    datasets = [{"path": "a.jsonl", "ds_type": "json", "type": "alpaca_chat.load_qa"},
                {"path": "b.jsonl", "ds_type": "json", "type": USER_DEFINED}]
    cfg = load(tmp_path, tms_cfg(datasets=datasets))
    assert [answer_field(d) for d in cfg.datasets] == ["answer", "reply"]
    plain = tms_cfg(processor_type="AutoProcessor")
    del plain["tms"]  # without `tms:` the plugin rejects nothing
    assert load(tmp_path, plain).processor_type == "AutoProcessor"


def test_the_plugins_own_harvest_config_may_hold_its_held_out_split():
    from tms_axolotl_plugin.dataset_support import check_training_settings

    config = {"test_datasets": [{"path": "heldout.jsonl"}]}
    check_training_settings(config, harvest_child=True)
    with pytest.raises(TMSConfigError, match="test_datasets"):
        check_training_settings(config)
