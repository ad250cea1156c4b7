"""LabelStore (label_store.py): append-only JSON-lines shards per rank that survive a kill."""

from __future__ import annotations

import json

import pytest

from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore


def label(key: str, checkpoint: int, text: str = "an answer",
          finish: str = "stop") -> GeneratedLabel:
    return GeneratedLabel(key, checkpoint, text, finish, num_tokens=len(text) + 1, prompt_tokens=17)


def test_records_round_trip_across_two_rank_shards(tmp_path):
    store = LabelStore(tmp_path / "labels")
    rank0 = [label("p0", 1, "zero one"), label("p1", 3, "ünïcödé ✓\nsecond line")]
    rank1 = [label("p0", 2, "zero two", "length"), label("p2", 1, "")]
    store.append(0, rank0[:1])
    store.append(1, rank1)
    store.append(0, rank0[1:])
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "labels-rank0.jsonl",
        "labels-rank1.jsonl",
    ]
    loaded = LabelStore(tmp_path / "labels").load()  # a fresh reader, as after a restart
    assert loaded == {(r.prompt_key, r.checkpoint): r for r in rank0 + rank1}


def test_empty_store_loads_nothing_and_empty_append_writes_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels")
    store.append(0, [])
    assert store.load() == {}
    assert list(store.directory.iterdir()) == []


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path):
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1, "kept")
    store.append(0, [first])
    shard = store.directory / "labels-rank0.jsonl"
    whole = json.dumps(
        {"prompt_key": "p1", "checkpoint": 1, "text": "lost", "finish_reason": "stop",
         "num_tokens": 5, "prompt_tokens": 17}
    )
    with open(shard, "a", encoding="utf-8") as handle:  # a writer killed mid-line
        handle.write(whole[: len(whole) // 2])

    assert store.load() == {("p0", 1): first}

    second = label("p2", 4, "written after the restart")
    store.append(0, [second])
    lines = shard.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt_key"] for line in lines] == ["p0", "p2"]
    assert store.load() == {("p0", 1): first, ("p2", 4): second}


def test_tail_torn_inside_a_multibyte_character_is_ignored(tmp_path):
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1, "kept")
    store.append(0, [first])
    shard = store.directory / "labels-rank0.jsonl"
    whole = json.dumps({"prompt_key": "p1", "checkpoint": 1, "text": "check ✓ mark",
                        "finish_reason": "stop", "num_tokens": 5, "prompt_tokens": 17},
                       ensure_ascii=False).encode()
    cut = whole.index("✓".encode()) + 1  # one byte into the three-byte character
    with open(shard, "ab") as handle:
        handle.write(whole[:cut])
    assert store.load() == {("p0", 1): first}
    store.append(0, [label("p2", 1)])
    assert set(store.load()) == {("p0", 1), ("p2", 1)}


def test_record_missing_only_its_newline_is_not_counted_until_rewritten(tmp_path):
    """A kill between the JSON text and its newline: the next append cuts that line, so a load
    before the append must not report it as stored (or it would be skipped and then lost)."""
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1)
    store.append(0, [first])
    shard = store.directory / "labels-rank0.jsonl"
    with open(shard, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt_key": "p1", "checkpoint": 2, "text": "unterminated",
                                 "finish_reason": "stop", "num_tokens": 3, "prompt_tokens": 17}))
    before = store.load()
    store.append(0, [label("p2", 1)])
    after = store.load()
    assert set(before) <= set(after), "a record reported as stored disappeared"
    assert ("p1", 2) not in after


def test_text_with_unicode_line_separators_survives_the_round_trip(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028/U+2029/U+0085 unescaped; they are not
    record boundaries."""
    store = LabelStore(tmp_path / "labels")
    odd = label("p0", 1, "one\u2028two\u2029three\x85four\r\nfive")
    store.append(0, [odd, label("p1", 1)])
    assert store.load() == {("p0", 1): odd, ("p1", 1): label("p1", 1)}


def test_first_record_for_a_key_wins_when_a_key_was_written_twice(tmp_path):
    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1, "from rank 0")])
    store.append(1, [label("p0", 1, "from rank 1")])
    assert store.load()[("p0", 1)].text == "from rank 0"


@pytest.mark.parametrize(
    "text,finish,usable",
    [
        ("The answer is 4.", "stop", True),
        ("", "stop", False),
        ("  \n\t", "stop", False),
        ("The answer is", "length", False),
        ("", "length", False),
    ],
)
def test_usable_only_for_non_empty_answers_that_ended_with_eos(text, finish, usable):
    assert label("p", 1, text, finish).usable is usable


def test_sampling_settings_are_recorded_once_and_a_different_record_is_refused(tmp_path):
    from tms_axolotl_plugin.errors import TMSError

    store = LabelStore(tmp_path / "labels")
    params = {"protocol": 2, "temperature": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    store.record_sampling(params)
    store.append(0, [label("p0", 1)])
    LabelStore(tmp_path / "labels").record_sampling(dict(params))  # the same: accepted
    assert json.loads((store.directory / "sampling.json").read_text()) == params
    with pytest.raises(TMSError, match="sampled with .*'repetition_penalty': 1.05"):
        store.record_sampling({**params, "repetition_penalty": 1.05})
    assert json.loads((store.directory / "sampling.json").read_text()) == params


def test_answers_without_a_sampling_record_are_not_mixed_with_new_ones(tmp_path):
    from tms_axolotl_plugin.errors import TMSError

    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1)])  # as an older version left it
    with pytest.raises(TMSError, match="without a record of their sampling settings"):
        store.record_sampling({"protocol": 2})
    assert not (store.directory / "sampling.json").exists()
