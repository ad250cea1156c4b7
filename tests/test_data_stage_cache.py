"""The data stage, tokenized once into an on-disk table, against what it gave before the cache.

`golden_data_stage` recorded, with the in-memory data stage this replaced, the prompts, answers,
held-out split, requests, student mixture and fingerprints of the demo data and of every chat
format; the cached stage must give exactly the same. A second launch must not tokenize again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_data_stage import (
    GOLDEN,
    build_configs,
    load,
    rows_digest,
    sha,
    synthetic_label,
    turn_record,
)

from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.mixture import write_student_mixture
from tms_axolotl_plugin.pipeline import Pipeline
from tms_axolotl_plugin.training_examples import table as table_module

GOLDEN_CASES = json.loads(GOLDEN.read_text())


def prepared(config_path, raw):
    from axolotl.loaders import load_tokenizer

    cfg, tms = load(config_path, raw)
    pipeline = Pipeline(cfg, tms, raw)
    pipeline.prepare_data(load_tokenizer(cfg))
    return pipeline


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("data_stage")
    return {name: (config, prepared(*config))
            for name, config in build_configs(workdir, tiny_model_dir).items()}


def digest(pipeline, plan, store_dir):
    table = pipeline.table
    requests = pipeline.turn_requests

    def record(row):
        turns = [(t.position, t.prompt_ids, t.answer_ids, t.kept)
                 for t in table.turn_objects(int(row))]
        return turn_record(int(table.dataset_index[row]), int(table.num_tokens[row]), turns)

    listed = sorted([requests.prompt_keys(np.array([i]))[0], int(requests.checkpoint[i]),
                     int(requests.max_new_tokens[i]),
                     sha(list(requests.request(i).prompt_ids))] for i in range(len(requests)))
    store = LabelStore(store_dir)
    store.append(0, [synthetic_label(key, t) for key, t, _, _ in listed])
    n = len(pipeline.dataset_configs)
    paths = {i: store_dir / f"mixture-{i}.jsonl" for i in range(n)
             if np.any(table.dataset_index[pipeline.train_rows] == i)}
    stats = write_student_mixture(table, pipeline.train_rows, plan, store, pipeline.slots,
                                  pipeline.cfg.sequence_len, paths)
    files = sorted(pipeline.paths.data.glob("*.jsonl"))
    return {"data_fp": pipeline.data_fp,
            "train": [record(r) for r in pipeline.train_rows],
            "heldout": [record(r) for r in pipeline.heldout_rows],
            "requests": sha(listed), "num_requests": len(listed),
            "targets": sha(plan.targets.tolist()),
            "mixture": [rows_digest([paths[i]])[0] if i in paths else sha([]) for i in range(n)],
            "mixture_stats": stats.as_dict(),
            "data_files": {f.name: rows_digest([f])[0] for f in files},
            "student_fp": pipeline.fingerprints(student_inputs=plan.targets.tolist())["student"],
            "harvest_fp": pipeline.fingerprints()["harvest"],
            "generation_fp": pipeline.fingerprints()["generation"]}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_cached_data_stage_gives_what_the_in_memory_stage_gave(name, stages, tmp_path):
    _, pipeline = stages[name]
    plan = pipeline.draw()
    got = digest(pipeline, plan, tmp_path / "labels")
    expected = GOLDEN_CASES[name]
    for field in expected:
        assert got[field] == expected[field], field


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_a_second_launch_reads_the_table_without_tokenizing(name, stages, monkeypatch):
    config, first = stages[name]

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("tms_axolotl_plugin.pipeline.build_example_table", refuse)
    monkeypatch.setattr(table_module.RowTokenizer, "__call__", refuse)
    # `load` clears tms/ for a fresh recording; a second launch keeps it, so build it here.
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    from tms_axolotl_plugin.config import tms_config_from

    cfg = load_cfg(str(config[0]))
    again = Pipeline(cfg, tms_config_from(cfg), config[1])
    again.prepare_data(load_tokenizer(cfg))
    assert again.data_fp == first.data_fp
    assert again.table.directory == first.table.directory
    assert np.array_equal(again.train_rows, first.train_rows)
    assert np.array_equal(again.table.turns.key, first.table.turns.key)


@pytest.mark.parametrize("turns", ["all", "last"])
def test_table_turns_and_caps_equal_the_in_memory_examples(stages, turns):
    """The table, opened with either `tms.turns`, holds the turns, kept reasons and answer caps
    `load_training_examples` finds row by row."""
    from axolotl.loaders import load_tokenizer

    from tms_axolotl_plugin.training_examples import load_training_examples
    from tms_axolotl_plugin.training_examples.table import ExampleTable, key_text
    from tms_axolotl_plugin.turn_requests import answerable_turns

    _, pipeline = stages["formats"]
    examples = load_training_examples(pipeline.cfg, load_tokenizer(pipeline.cfg), turns)
    table = ExampleTable.open(pipeline.table.directory, turns)
    answerable = answerable_turns(table, pipeline.cfg.sequence_len)
    assert len(table) == len(examples)
    for row, example in enumerate(examples):
        assert table.turn_objects(row) == example.turns
        caps = example.answer_caps(pipeline.cfg.sequence_len)
        span = table.turns.of_row(row)
        assert [key_text(k) for k in table.turns.key[span.start:span.stop]] == [
            t.key for t in example.turns]
        assert {i - span.start: int(answerable.cap[i]) for i in span
                if answerable.mask[i]} == {example.turns.index(t): c for t, c in caps.items()}
        assert table.num_tokens[row] == example.num_tokens
        assert table.row(row) == json.loads(json.dumps(example.row, default=str))
