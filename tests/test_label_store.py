"""LabelStore (label_store.py): JSON-lines segments per rank with an index; appends survive a
kill, cost nothing that grows with the store, and reads do not build the store in memory."""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from tms_axolotl_plugin import label_store
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore


def label(key: str, checkpoint: int, text: str = "an answer",
          finish: str = "stop") -> GeneratedLabel:
    return GeneratedLabel(key, checkpoint, text, finish, num_tokens=len(text) + 1, prompt_tokens=17)


def killed(store: LabelStore) -> None:
    """What a SIGKILL does to a writer: its files are closed, nothing else happens."""
    for writer in store._writers.values():
        writer.close(seal=False)
    store._writers.clear()


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


def test_lines_are_the_json_of_the_dataclass(tmp_path):
    """Users read the files with jq or pandas: one JSON object per line, the dataclass's fields
    in order, text as UTF-8."""
    store = LabelStore(tmp_path / "labels")
    records = [label("p0", 1, 'quote " backslash \\ tab \t ✓ \u2028'), label("p1", 2)]
    store.append(0, records)
    data = (store.directory / "labels-rank0.jsonl").read_bytes()
    assert "✓".encode() in data
    lines = data.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 3
    assert [list(json.loads(line).items()) for line in lines[:-1]] == [
        list(asdict(r).items()) for r in records]


def test_empty_store_loads_nothing_and_empty_append_writes_nothing(tmp_path):
    store = LabelStore(tmp_path / "labels")
    store.append(0, [])
    assert store.load() == {}
    assert store.count() == 0
    assert store.lookup([("p0", 1)]) == {}
    assert store.contains([("p0", 1)]).tolist() == [False]
    assert list(store.iter_labels()) == []
    assert list(store.directory.iterdir()) == []


def test_torn_last_line_is_ignored_and_cut_when_the_next_writer_opens(tmp_path):
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1, "kept")
    store.append(0, [first])
    killed(store)
    shard = store.directory / "labels-rank0.jsonl"
    whole = json.dumps(
        {"prompt_key": "p1", "checkpoint": 1, "text": "lost", "finish_reason": "stop",
         "num_tokens": 5, "prompt_tokens": 17}
    )
    with open(shard, "a", encoding="utf-8") as handle:  # the writer was killed mid-line
        handle.write(whole[: len(whole) // 2])

    assert store.load() == {("p0", 1): first}

    second = label("p2", 4, "written after the restart")
    restarted = LabelStore(tmp_path / "labels")
    restarted.append(0, [second])
    lines = shard.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prompt_key"] for line in lines] == ["p0", "p2"]
    assert store.load() == {("p0", 1): first, ("p2", 4): second}


def test_tail_torn_inside_a_multibyte_character_is_ignored(tmp_path):
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1, "kept")
    store.append(0, [first])
    killed(store)
    shard = store.directory / "labels-rank0.jsonl"
    whole = json.dumps({"prompt_key": "p1", "checkpoint": 1, "text": "check ✓ mark",
                        "finish_reason": "stop", "num_tokens": 5, "prompt_tokens": 17},
                       ensure_ascii=False).encode()
    cut = whole.index("✓".encode()) + 1  # one byte into the three-byte character
    with open(shard, "ab") as handle:
        handle.write(whole[:cut])
    assert store.load() == {("p0", 1): first}
    LabelStore(tmp_path / "labels").append(0, [label("p2", 1)])
    assert set(store.load()) == {("p0", 1), ("p2", 1)}


def test_record_missing_only_its_newline_is_not_counted_until_rewritten(tmp_path):
    """A kill between the JSON text and its newline: the next writer cuts that line, so a load
    before it must not report it as stored (or it would be skipped and then lost)."""
    store = LabelStore(tmp_path / "labels")
    first = label("p0", 1)
    store.append(0, [first])
    killed(store)
    shard = store.directory / "labels-rank0.jsonl"
    with open(shard, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt_key": "p1", "checkpoint": 2, "text": "unterminated",
                                 "finish_reason": "stop", "num_tokens": 3, "prompt_tokens": 17}))
    before = store.load()
    assert store.contains([("p1", 2)]).tolist() == [False]
    LabelStore(tmp_path / "labels").append(0, [label("p2", 1)])
    after = store.load()
    assert set(before) <= set(after), "a record reported as stored disappeared"
    assert ("p1", 2) not in after


def test_a_line_of_zeros_ends_what_counts_as_written(tmp_path):
    """A region a crash (or a network file system) has not filled yet reads as zeros: neither it
    nor anything after it is an answer until a writer has cut it off."""
    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1)])
    killed(store)
    shard = store.directory / "labels-rank0.jsonl"
    with open(shard, "ab") as handle:
        handle.write(b"\0" * 100 + b"\n" + (json.dumps(asdict(label("p1", 1))) + "\n").encode())
    assert set(store.load()) == {("p0", 1)}
    assert store.count() == 1
    LabelStore(tmp_path / "labels").append(0, [label("p2", 1)])
    assert set(store.load()) == {("p0", 1), ("p2", 1)}


def test_text_with_unicode_line_separators_survives_the_round_trip(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028/U+2029/U+0085 unescaped; they are not
    record boundaries."""
    store = LabelStore(tmp_path / "labels")
    odd = label("p0", 1, "one\u2028two\u2029three\x85four\r\nfive")
    lone = label("p2", 1, "a lone surrogate \ud800 from a bad decode")
    store.append(0, [odd, label("p1", 1), lone])
    assert store.load() == {("p0", 1): odd, ("p1", 1): label("p1", 1), ("p2", 1): lone}


@pytest.mark.skipif(label_store.orjson is None, reason="orjson is not installed")
def test_orjson_and_the_json_module_read_each_others_lines(tmp_path, monkeypatch):
    """orjson, when installed, writes compact lines; the json module spaced ones, as older
    versions did: a store may hold both, and either reads them."""
    fast = [label("p0", 1, "ünï \u2028 ✓"), label("p1", np.int64(2)), label("p2", 1, "\ud800")]
    store = LabelStore(tmp_path / "labels")
    store.append(0, fast[:2])
    store.append(0, fast[2:])  # orjson refuses a lone surrogate: json writes that batch
    monkeypatch.setattr(label_store, "orjson", None)
    slow = [label("p3", 1, "ünï \u2028 ✓"), label("p4", np.int64(2)), label("p5", 1, "\ud800")]
    store.append(0, slow)
    expected = {(r.prompt_key, int(r.checkpoint)): r for r in fast + slow}
    assert LabelStore(tmp_path / "labels").load() == expected
    monkeypatch.undo()
    assert LabelStore(tmp_path / "labels").load() == expected
    lines = (store.directory / "labels-rank0.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    assert lines[0].startswith('{"prompt_key":"p0",') and lines[3].startswith(
        '{"prompt_key": "p3", ')
    assert all(type(json.loads(line)["checkpoint"]) is int for line in lines)


def test_an_answer_whose_key_is_not_a_string_and_an_integer_is_refused(tmp_path):
    store = LabelStore(tmp_path / "labels")
    for bad in (label("p0", True), label("p0", 1.0), GeneratedLabel(7, 1, "", "stop", 1, 1)):
        with pytest.raises(TypeError, match="prompt_key is a string and its checkpoint"):
            store.append(0, [label("p1", 1), bad])
    store.append(0, [label("p2", 1)])
    assert set(store.load()) == {("p2", 1)}


def test_first_record_for_a_key_wins_when_a_key_was_written_twice(tmp_path):
    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1, "from rank 0")])
    store.append(1, [label("p0", 1, "from rank 1")])
    assert store.load()[("p0", 1)].text == "from rank 0"


def test_reads_agree_across_ranks_segments_and_duplicates(tmp_path):
    """Ranks are ordered by number (rank 2 before rank 10), then segments, then lines; the first
    occurrence of a key is the one lookup, iter_labels, load and count all see."""
    store = LabelStore(tmp_path / "labels", segment_records=4)
    expected: dict[tuple[str, int], GeneratedLabel] = {}

    def write(rank: int, records: list[GeneratedLabel]) -> None:
        store.append(rank, records)
        for r in records:
            expected.setdefault((r.prompt_key, r.checkpoint), r)

    write(10, [label(f"q{i}", 1, f"rank 10 #{i}") for i in range(6)])
    write(2, [label(f"q{i}", 1, f"rank 2 #{i}") for i in range(3, 9)])  # q3..q5 win from rank 2
    expected.update({(f"q{i}", 1): label(f"q{i}", 1, f"rank 2 #{i}") for i in range(3, 6)})
    write(2, [label("q3", 1, "rank 2 again, in its next segment"), label("q3", 2, "checkpoint 2")])
    write(0, [label(f"r{i}", t, f"r{i} at {t}") for i in range(5) for t in (1, 2)])
    write(0, [label("r0", 1, "duplicate in the same rank")])
    names = sorted(p.name for p in store.directory.iterdir())
    assert "labels-rank0-00001.jsonl" in names and "labels-rank0.index" in names

    reader = LabelStore(tmp_path / "labels")
    assert reader.load() == expected
    assert reader.count() == len(expected)
    batches = list(reader.iter_labels(batch_size=3))
    assert all(1 <= len(b) <= 3 for b in batches)
    streamed = [(r.prompt_key, r.checkpoint) for b in batches for r in b]
    assert len(streamed) == len(set(streamed)) == len(expected)
    asked = [*expected, ("q3", 3), ("missing", 1), ("r0", 7)]
    assert reader.lookup(iter(asked)) == expected  # any iterable; the missing ones are absent
    assert reader.contains(asked).tolist() == [True] * len(expected) + [False] * 3


def test_lookup_and_contains_take_more_pairs_than_one_internal_batch(tmp_path):
    store = LabelStore(tmp_path / "labels", segment_records=15_000)
    records = [label(f"{i:016x}", 1 + i % 3, f"answer {i}") for i in range(40_000)]
    for start in range(0, len(records), 10_000):
        store.append(start // 20_000, records[start : start + 10_000])
    pairs = [(r.prompt_key, r.checkpoint) for r in records]
    wanted = pairs[::3] + [("absent", 1)] * 5
    found = LabelStore(tmp_path / "labels").lookup(wanted)
    assert len(found) == len(pairs[::3])
    assert all(found[p].text == f"answer {int(p[0], 16)}" for p in pairs[::3])
    assert store.contains(wanted).sum() == len(pairs[::3])
    assert store.count() == len(records)


def test_a_store_written_by_an_older_version_is_read_as_is_and_extended(tmp_path):
    """Older versions wrote the same lines to labels-rank<r>.jsonl, each rank's first segment
    now, so nothing is migrated: the files are read in place and the first writer of a rank cuts
    a torn tail, as before."""
    directory = tmp_path / "labels"
    directory.mkdir()
    params = {"protocol": 2, "temperature": 1.0}
    (directory / "sampling.json").write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")
    old = {0: [label("p0", 1), label("p1", 1, "ünï")], 1: [label("p0", 2, "", "length")]}
    for rank, records in old.items():
        with open(directory / f"labels-rank{rank}.jsonl", "w", encoding="utf-8") as handle:
            # exactly as the older version's append wrote them
            handle.writelines(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)
    with open(directory / "labels-rank1.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"prompt_key": "torn", "check')

    store = LabelStore(directory)
    store.record_sampling(dict(params))
    stored = {(r.prompt_key, r.checkpoint): r for rs in old.values() for r in rs}
    assert store.load() == stored
    store.append(1, [label("p2", 1)])
    assert LabelStore(directory).load() == {**stored, ("p2", 1): label("p2", 1)}
    assert (directory / "labels-rank1.jsonl").read_text(encoding="utf-8").count("torn") == 0


def test_closing_indexes_the_last_segment_and_the_next_writer_starts_a_new_one(tmp_path):
    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1)])
    store.append(1, [label("p1", 1)])
    store.close()
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "labels-rank0.index", "labels-rank0.jsonl", "labels-rank1.index", "labels-rank1.jsonl"]
    store.append(0, [label("p2", 1)])  # the same store goes on writing, in a new segment
    assert (store.directory / "labels-rank0-00001.jsonl").exists()
    assert set(LabelStore(tmp_path / "labels").load()) == {("p0", 1), ("p1", 1), ("p2", 1)}


def test_a_second_writer_of_a_rank_is_refused(tmp_path):
    first = LabelStore(tmp_path / "labels")
    first.append(0, [label("p0", 1)])
    second = LabelStore(tmp_path / "labels")
    second.append(1, [label("p1", 1)])  # another rank: fine
    with pytest.raises(TMSError, match="another process is writing rank 0"):
        second.append(0, [label("p2", 1)])
    first.close()
    second.append(0, [label("p2", 1)])
    assert set(second.load()) == {("p0", 1), ("p1", 1), ("p2", 1)}


def test_full_segments_are_indexed_and_a_lost_index_is_rebuilt(tmp_path):
    store = LabelStore(tmp_path / "labels", segment_records=4)
    records = [label(f"p{i}", 1, f"answer {i}") for i in range(10)]
    for start in range(0, 10, 2):
        store.append(0, records[start : start + 2])
    directory = store.directory
    assert sorted(p.name for p in directory.iterdir()) == [
        "labels-rank0-00001.index", "labels-rank0-00001.jsonl", "labels-rank0-00002.jsonl",
        "labels-rank0.index", "labels-rank0.jsonl"]
    (directory / "labels-rank0.index").unlink()
    (directory / "labels-rank0-00001.index").write_bytes(b"not an index")
    reader = LabelStore(directory)
    assert reader.load() == {(r.prompt_key, r.checkpoint): r for r in records}  # by scanning
    killed(store)
    (directory / "labels-rank0-00001.index").unlink()
    LabelStore(directory, segment_records=4).append(0, [label("p10", 1)])
    assert (directory / "labels-rank0.index").exists()
    assert (directory / "labels-rank0-00001.index").exists()
    assert LabelStore(directory).count() == 11


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
    store = LabelStore(tmp_path / "labels")
    store.append(0, [label("p0", 1)])  # as an older version left it
    with pytest.raises(TMSError, match="without a record of their sampling settings"):
        store.record_sampling({"protocol": 2})
    assert not (store.directory / "sampling.json").exists()


# ---- a real SIGKILL, and appends that read nothing ----------------------------------------


def answer_for(batch: int, item: int) -> GeneratedLabel:
    """The deterministic answer `item` of appended batch `batch` (the child writes these): 20
    of them make a batch of about 600 kB, so a kill can land inside its write."""
    text = "✓ ünï line\n" * ((batch * 7919 + item * 104729) % 4000) + f"{batch}/{item}"
    return GeneratedLabel(f"{batch:08x}{item:08x}", 1 + item % 3, text, "stop", len(text), item)


CHILD = """
import os, sys
from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore
{answer_for}
full_pwrite = os.pwrite
os.pwrite = lambda fd, data, offset: full_pwrite(fd, data[:4096], offset)  # short writes
store = LabelStore(sys.argv[1], segment_records=150)
first = int(sys.argv[2])
for batch in range(first, first + 100_000):
    records = [answer_for(batch, item) for item in range(20)]
    print("next", flush=True)
    store.append(0, records)
    print(batch, flush=True)
"""


def kill_writer(directory: Path, first_batch: int, rng: random.Random) -> set[int]:
    """Start a child appending batches first_batch, first_batch + 1, ...; SIGKILL it while it
    opens the store or a few batches in, at a random moment; the batches it reported done. Its
    pwrite calls write at most 4 KiB each (a short write, as on a network file system), so a
    kill often lands inside a batch's write."""
    script = CHILD.format(answer_for=inspect.getsource(answer_for))
    child = subprocess.Popen([sys.executable, "-c", script, str(directory), str(first_batch)],
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    done = set()
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.05, 0.5))  # in its start-up or its opening of the rank
    else:
        appends = rng.randint(1, 12)
        while len(done) < appends and (line := child.stdout.readline()):
            if line != b"next\n":
                done.add(int(line))
        child.stdout.readline()  # "next": it is about to write its next batch
        time.sleep(rng.uniform(0, 0.02))
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return done | {int(line) for line in out.split() if line != b"next"}


def test_writers_killed_mid_append_lose_no_complete_record(tmp_path):
    directory = tmp_path / "labels"
    rng = random.Random(12)
    committed: set[int] = set()
    for round_ in range(8):
        committed |= kill_writer(directory, round_ * 100_000, rng)
    assert committed, "no child got as far as one append"
    LabelStore(directory).append(0, [answer_for(999_999, 0)])  # opens fine, repairs the tail

    store = LabelStore(directory)
    stored = store.load()
    for batch in committed:
        for item in range(20):
            assert stored[(f"{batch:08x}{item:08x}", 1 + item % 3)] == answer_for(batch, item)
    items_of: dict[int, list[int]] = {}
    for (key, _), record in stored.items():  # nothing corrupt
        batch, item = int(key[:8], 16), int(key[8:], 16)
        assert record == answer_for(batch, item)
        items_of.setdefault(batch, []).append(item)
    for batch, items in items_of.items():  # a killed append keeps a prefix of its batch
        assert sorted(items) == list(range(len(items))), batch
    assert len(set(items_of) - committed - {999_999}) <= 8, "at most the append at each kill"
    assert store.count() == len(stored)

    keys = []  # every line of every file is a whole record, and none is there twice
    for path in sorted(directory.glob("labels-rank0*.jsonl")):
        data = path.read_bytes()
        assert data.endswith(b"\n") or not data
        keys += [(r["prompt_key"], r["checkpoint"]) for r in map(json.loads, data.splitlines())]
    assert len(keys) == len(set(keys)) == len(stored)
    assert not list(directory.glob(".*.tmp"))


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (all files, pipes, ...)."""
    with open("/proc/self/io", encoding="ascii") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/<pid>/io")
def test_appends_read_nothing_back_from_a_large_store(tmp_path):
    """200k answers: reopening the rank scans its last segment only (the one that can have a
    torn tail); after that, appends read nothing, however large the store."""
    directory = tmp_path / "labels"
    build = LabelStore(directory, segment_records=150_000)
    for start in range(0, 200_000, 20_000):
        build.append(0, [label(f"{i:016x}", 1 + i % 4, f"answer {i} " + "x" * 150)
                         for i in range(start, start + 20_000)])
    killed(build)
    first, last = directory / "labels-rank0.jsonl", directory / "labels-rank0-00001.jsonl"
    assert sorted(directory.glob("labels-rank0*.jsonl")) == [last, first]
    assert (directory / "labels-rank0.index").exists()
    whole, tail = first.stat().st_size + last.stat().st_size, last.stat().st_size

    store = LabelStore(directory, segment_records=150_000)
    before = bytes_read()
    store.append(0, [label("opening", 1)])
    opening = bytes_read() - before
    assert opening < tail + 64 * 1024 < whole / 2, "opening read more than the last segment"
    for i in range(5):
        before = bytes_read()
        store.append(0, [label(f"after {i}", 1, "x" * 150)])
        assert bytes_read() - before < 4096
    assert LabelStore(directory).count() == 200_000 + 1 + 5
