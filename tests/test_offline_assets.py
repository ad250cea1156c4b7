"""Offline assets: the converted SmolLM2, the tiny Llama, GSM8K / MMLU-STEM, and the build cache.

Model tests use the default cache root (session fixtures from conftest), so the expensive GGUF
conversion runs once per machine; cache-behaviour tests use a temporary root and the cheap data
builders.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tms_axolotl_plugin import offline_assets
from tms_axolotl_plugin.offline_assets import (
    COMPLETE_MARKER,
    asdiv_jsonl,
    extract_final_number,
    gsm8k_jsonl,
    mmlu_stem_jsonl,
    smollm2_dir,
    smollm2_gguf_path,
    tiny_llama_dir,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "What is 2+3?"}]
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _marker_mtime(asset_dir: Path) -> int:
    return (asset_dir / COMPLETE_MARKER).stat().st_mtime_ns


@pytest.fixture
def temp_cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "assets"
    monkeypatch.setenv(offline_assets.CACHE_DIR_ENV, str(root))
    return root


# --------------------------------------------------------------------------------------------
# SmolLM2 (real model, converted from the GGUF)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_dir_is_a_plain_hf_checkpoint(smollm2_model_dir):
    from transformers import AutoTokenizer

    assert smollm2_model_dir.parent == offline_assets.cache_root()
    assert (smollm2_model_dir / "model.safetensors").is_file()
    config = json.loads((smollm2_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["dtype"] == "float32"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((smollm2_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == config["eos_token_id"]

    # Idempotent: the second call returns the cached directory without touching it.
    mtime = _marker_mtime(smollm2_model_dir)
    assert smollm2_dir() == smollm2_model_dir
    assert _marker_mtime(smollm2_model_dir) == mtime


@pytest.mark.slow
def test_smollm2_dir_generates_exactly_like_the_gguf(smollm2_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # "What is 2+3?" is answered in six tokens ("2 + 3 = 5<|im_end|>"); the second prompt runs
    # the full 20 tokens so that the comparison covers a longer greedy path.
    prompts = [PROMPT, [{"role": "user", "content": "Explain photosynthesis in one paragraph."}]]

    def run(model, tokenizer) -> list[tuple[list[int], list[int], torch.Tensor]]:
        results = []
        for messages in prompts:
            batch = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                logits = model(**batch).logits[0, -1]
                out = model.generate(
                    **batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            prompt_ids = batch["input_ids"][0].tolist()
            results.append((prompt_ids, out[0, len(prompt_ids) :].tolist(), logits))
        return results

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_dir).eval()
    converted = run(model, tokenizer)
    del model
    gc.collect()

    gguf = smollm2_gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    reference = run(gguf_model, gguf_tokenizer)
    del gguf_model
    gc.collect()

    for ours, theirs in zip(converted, reference, strict=True):
        (prompt_ids, new_ids, logits), (ref_prompt_ids, ref_new_ids, ref_logits) = ours, theirs
        assert prompt_ids == ref_prompt_ids
        assert new_ids == ref_new_ids
        assert torch.equal(logits, ref_logits)
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        assert text == gguf_tokenizer.decode(ref_new_ids, skip_special_tokens=True)
        assert text.strip(), "the model produced only special tokens"
    assert "5" in tokenizer.decode(converted[0][1])
    assert len(converted[1][1]) == 20


# --------------------------------------------------------------------------------------------
# Tiny random Llama
# --------------------------------------------------------------------------------------------


def test_tiny_llama_shape_and_tokenizer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.intermediate_size == 256
    assert config.max_position_embeddings == 2048
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    batch = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_tiny_llama_is_identical_across_builds(tiny_model_dir, temp_cache_root):
    rebuilt = tiny_llama_dir()
    assert rebuilt == temp_cache_root / tiny_model_dir.name != tiny_model_dir
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert _sha256(rebuilt / name) == _sha256(tiny_model_dir / name), name

    # Pinned values: the weights come from NumPy's PCG64 stream, which is the same on every
    # machine; a change here means every machine's cached tiny model changed too.
    from safetensors.numpy import load_file

    weights = load_file(rebuilt / "model.safetensors")
    assert weights["model.embed_tokens.weight"][0, :4].tolist() == pytest.approx(
        [0.0025146045, -0.0026420972, 0.0128084533, 0.0020980022], abs=1e-9
    )
    assert weights["model.layers.1.mlp.down_proj.weight"][-1, -3:].tolist() == pytest.approx(
        [-0.0063564652, -0.0191478189, -0.0292352568], abs=1e-9
    )
    assert (weights["model.norm.weight"] == 1).all()

    mtime = _marker_mtime(rebuilt)
    assert tiny_llama_dir() == rebuilt
    assert _marker_mtime(rebuilt) == mtime


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "rows"), [("train", 7473), ("test", 1319)])
def test_gsm8k_rows(split, rows):
    path = gsm8k_jsonl(split)
    assert path.parent.parent == offline_assets.cache_root()
    data = _read_jsonl(path)
    assert len(data) == rows
    for row in data:
        assert set(row) == {"messages", "question", "final_answer"}
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["question"]}
        assert row["question"].strip()
        assert assistant["role"] == "assistant" and "####" in assistant["content"]
        assert NUMBER.fullmatch(row["final_answer"]), row
        assert extract_final_number(assistant["content"]) == row["final_answer"]
    # Answers with thousands separators lose their commas ("#### 1,080" -> "1080").
    assert any("," in r["messages"][1]["content"].rsplit("####", 1)[1] for r in data)


def test_asdiv_split_is_fixed_disjoint_and_graded_by_its_last_number():
    train, test = _read_jsonl(asdiv_jsonl("train")), _read_jsonl(asdiv_jsonl("test"))
    assert (len(train), len(test)) == (1784, 300)
    ids = [r["asdiv_idx"] for r in train], [r["asdiv_idx"] for r in test]
    assert not set(ids[0]) & set(ids[1]) and all(i == sorted(i) for i in ids)
    assert ids[1][:5] == [2, 24, 30, 45, 46]  # the split does not move between versions
    for row in train + test:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["question"]}
        assert NUMBER.fullmatch(row["final_answer"]), row
        assert assistant["content"].endswith(f"The answer is {row['final_answer']}.")
        assert extract_final_number(assistant["content"]) == row["final_answer"]


def test_gsm8k_rejects_unknown_split():
    with pytest.raises(ValueError):
        gsm8k_jsonl("validation")  # type: ignore[arg-type]


def test_mmlu_stem_rows():
    data = _read_jsonl(mmlu_stem_jsonl())
    assert len(data) == 3018
    subjects = set()
    for row in data:
        assert set(row) == {"question", "choices", "answer", "subject"}
        assert row["question"].strip()
        assert len(row["choices"]) == 4 and all(isinstance(c, str) for c in row["choices"])
        assert isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"])
        subjects.add(row["subject"])
    assert {"abstract_algebra", "college_physics", "high_school_mathematics"} <= subjects
    assert len(subjects) == 18


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("... so 1,000 + 80 = 1,080\n#### 1,080", "1080"),
        ("#### -3", "-3"),
        ("#### 0.50", "0.5"),
        ("#### 18.00", "18"),
        ("#### $1,234.5 dollars", "1234.5"),
        ("The answer is 42.", "42"),
        ("First 3 apples, then 7 pears, so 10 fruits in total.", "10"),
        ("I used 2 steps. #### then 5", "5"),
        ("Sequence 1,2,3", "3"),
        ("no number here", None),
        ("", None),
        ("#### unknown, but earlier we had 12", "12"),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


# --------------------------------------------------------------------------------------------
# Build cache behaviour
# --------------------------------------------------------------------------------------------


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(offline_assets.CACHE_DIR_ENV, str(tmp_path / "x"))
    assert offline_assets.cache_root() == tmp_path / "x"
    monkeypatch.delenv(offline_assets.CACHE_DIR_ENV)
    assert offline_assets.cache_root() == Path.home() / ".cache" / "tms-axolotl-plugin" / "assets"


def test_second_call_does_not_rebuild(temp_cache_root, monkeypatch):
    first = mmlu_stem_jsonl()
    mtime = _marker_mtime(first.parent)

    def must_not_run(out):
        raise AssertionError("rebuilt a complete asset")

    monkeypatch.setattr(offline_assets, "_build_mmlu_stem", must_not_run)
    assert mmlu_stem_jsonl() == first
    assert _marker_mtime(first.parent) == mtime


def test_concurrent_builders_build_once(temp_cache_root, monkeypatch):
    calls = []
    real_build = offline_assets._build_gsm8k

    def slow_build(out):
        calls.append(out)
        time.sleep(0.5)  # keep the lock long enough for the other thread to wait on it
        return real_build(out)

    monkeypatch.setattr(offline_assets, "_build_gsm8k", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gsm8k_jsonl("test"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert len(_read_jsonl(results[0])) == 1319


def test_failed_build_leaves_nothing_behind(temp_cache_root, monkeypatch):
    def broken_build(out):
        (out / "test.jsonl").write_text("half a file")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(offline_assets, "_build_mmlu_stem", broken_build)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        mmlu_stem_jsonl()
    leftovers = [p.name for p in temp_cache_root.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_leftovers_of_a_killed_build_are_replaced(temp_cache_root):
    name = offline_assets.MMLU_STEM_ASSET
    stale_tmp = temp_cache_root / f".{name}.tmp-killed"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "test.jsonl").write_text("partial")
    unmarked = temp_cache_root / name
    unmarked.mkdir()
    (unmarked / "test.jsonl").write_text("not trusted without a marker")

    path = mmlu_stem_jsonl()
    assert path == unmarked / "test.jsonl"
    assert not stale_tmp.exists()
    assert len(_read_jsonl(path)) == 3018
    assert offline_assets.is_complete(unmarked)


def test_cli_prints_paths(temp_cache_root):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tms_axolotl_plugin.offline_assets", "gsm8k"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    assert proc.stdout.split() == [
        str(temp_cache_root / offline_assets.GSM8K_ASSET / "train.jsonl"),
        str(temp_cache_root / offline_assets.GSM8K_ASSET / "test.jsonl"),
    ]
    assert "building" in proc.stderr
