"""The plugin's data path at 10k-1M rows, stage by stage, beside Axolotl's own preprocessing.

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    $(scripts/env.sh trainer)/bin/python bench/data_path.py --rows 10000 --kind short [--procs 2]

(trainer venv). Synthetic chat rows (`--kind short`: GSM8K-length, one question and answer;
`--kind long`: ~1,000 tokens in three user/assistant exchanges), the project's tiny Llama
tokenizer, `dataset_num_proc = --procs` for both. Each stage runs in its own child process, so
its wall time and peak RSS are its own (`rss_mb`: the child's maximum resident set, memory-mapped
pages it touched included; `anon_rss_mb`: its peak anonymous memory, sampled, i.e. without
memory-mapped files; `workers`: the largest of its worker processes):
- data: `Pipeline.prepare_data` on a fresh output_dir (tokenize into the table, streamed
  fingerprint, data files); data (rerun): the same on the same output_dir (reads the table);
- requests: `Pipeline.draw` (draws and the turn requests), after a data rerun;
- store append / store lookup: a synthetic answer for every request appended to a LabelStore
  in batches of 256, then every answer looked up as the mixture does;
- mixture: `write_student_mixture`, all epochs;
- axolotl: Axolotl's own `load_datasets` of the same rows (tokenize, drop long rows, pack,
  save), same config without the plugin, fresh `dataset_prepared_path`.
`data` and `axolotl` each start with an empty datasets cache (`HF_DATASETS_CACHE`), so both
convert the JSON rows and neither finds an earlier run's tokenization; the plugin's later stages
use the cache its `data` run left, as a relaunch would.
Appends to bench/results/data_path.json (one entry per kind and row count) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_path.json"
WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may", "down", "side", "been", "now", "find", "any", "new", "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round", "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through", "just", "form", "sentence", "great", "think", "say", "help", "low", "line", "differ", "turn", "cause", "much", "mean", "before", "move", "right", "boy", "old", "too", "same", "tell", "does", "set", "three", "want", "air", "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large", "spell", "add", "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why", "ask", "men", "change", "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal", "point", "mother", "world", "near", "build", "self", "earth", "father", "12", "7", "300", "45", "1999", "3.5", "+", "=", "*", "/", "$", "%"]
STAGES = ("data", "data-rerun", "requests", "store-append", "store-lookup", "mixture",
          "axolotl")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_rows(path: Path, rows: int, kind: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as out:
        for index in range(rows):
            if kind == "short":  # GSM8K: ~45-word questions, ~100-word worked answers
                messages = [{"role": "user", "content": text(rng, rng.randint(25, 70))},
                            {"role": "assistant", "content": text(rng, rng.randint(50, 160))}]
            else:  # ~1,000 tokens: three exchanges
                messages = []
                for _ in range(3):
                    messages += [{"role": "user", "content": text(rng, rng.randint(40, 120))},
                                 {"role": "assistant",
                                  "content": text(rng, rng.randint(120, 260))}]
            out.write(json.dumps({"id": index, "messages": messages}) + "\n")


def config(workdir: Path, data: Path, kind: str, procs: int, plugin: bool) -> Path:
    import yaml

    from tms_axolotl_plugin.offline_assets import tiny_llama_dir

    cfg = {
        "base_model": str(tiny_llama_dir()), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template",
                      "split": "train"}],
        "chat_template": "tokenizer_default", "val_set_size": 0,
        "dataset_prepared_path": str(workdir / "prepared"),
        "output_dir": str(workdir / "out"), "sequence_len": 512 if kind == "short" else 2048,
        "sample_packing": True, "pad_to_sequence_len": True, "micro_batch_size": 1,
        "gradient_accumulation_steps": 1, "num_epochs": 2, "optimizer": "adamw_torch",
        "learning_rate": 1e-4, "bf16": False, "fp16": False, "tf32": False,
        "attn_implementation": "sdpa", "save_strategy": "no", "seed": 7,
        "dataset_num_proc": procs, "report_to": "none",
    }
    if plugin:
        cfg["plugins"] = ["tms_axolotl_plugin.TMSPlugin"]
        cfg["tms"] = {"num_checkpoints": 10, "alpha": 0.25, "seed": 0,
                      "pld": {"enabled": True, "heldout_size": 0.01},
                      "retention": {"enabled": False}}
    path = workdir / ("plugin.yml" if plugin else "axolotl.yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- child side --------------------------------------------------------------------------------
def child(stage: str, workdir: Path) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    if stage == "axolotl":
        from axolotl.common.datasets import load_datasets

        cfg = load_cfg(str(workdir / "axolotl.yml"))
        shutil.rmtree(workdir / "prepared", ignore_errors=True)
        started = time.perf_counter()
        meta = load_datasets(cfg=cfg)
        return {"seconds": time.perf_counter() - started, "rows": len(meta.train_dataset)}

    # What `axolotl train` has imported before the plugin's hook runs: not the stage's cost.
    import axolotl.common.datasets
    import axolotl.prompt_strategies.chat_template  # noqa: F401

    from tms_axolotl_plugin.config import tms_config_from
    from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore
    from tms_axolotl_plugin.mixture import write_student_mixture
    from tms_axolotl_plugin.pipeline import Pipeline

    cfg = load_cfg(str(workdir / "plugin.yml"))
    pipeline = Pipeline(cfg, tms_config_from(cfg))
    pipeline.paths.markers.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg)
    started = time.perf_counter()
    pipeline.prepare_data(tokenizer)
    if stage in ("data", "data-rerun"):
        return {"seconds": time.perf_counter() - started, "rows": len(pipeline.table),
                "tokenize_seconds": pipeline.log.extra.get("tokenized_seconds")}
    started = time.perf_counter()
    plan = pipeline.draw()
    requests = pipeline.turn_requests
    if stage == "requests":
        return {"seconds": time.perf_counter() - started, "requests": len(requests)}
    store = LabelStore(workdir / "labels")
    rng = random.Random(1)
    if stage == "store-append":
        shutil.rmtree(workdir / "labels", ignore_errors=True)
        store = LabelStore(workdir / "labels")
        started = time.perf_counter()
        for start in range(0, len(requests), 256):
            index = range(start, min(start + 256, len(requests)))
            keys = requests.prompt_keys(list(index))
            store.append(0, [GeneratedLabel(k, int(requests.checkpoint[i]),
                                            text(rng, rng.randint(50, 160)), "stop", 120, 100)
                             for k, i in zip(keys, index, strict=True)])
        return {"seconds": time.perf_counter() - started, "answers": len(requests)}
    if stage == "store-lookup":
        started = time.perf_counter()
        found = 0
        for start in range(0, len(requests), 4096):
            index = list(range(start, min(start + 4096, len(requests))))
            keys = requests.prompt_keys(index)
            found += len(store.lookup([(k, int(requests.checkpoint[i]))
                                       for k, i in zip(keys, index, strict=True)]))
        return {"seconds": time.perf_counter() - started, "answers": found}
    if stage == "mixture":
        paths = {0: workdir / "mixture-0.jsonl"}
        started = time.perf_counter()
        stats = write_student_mixture(pipeline.table, pipeline.train_rows, plan, store,
                                      pipeline.slots, cfg.sequence_len, paths)
        return {"seconds": time.perf_counter() - started, "rows": stats.rows}
    raise ValueError(stage)


class AnonPeak:
    """Peak anonymous resident memory (heap, not memory-mapped file pages), sampled every 0.1 s:
    the goal's "memory-mapped files aside"; ru_maxrss counts the table's touched pages too."""

    def __init__(self) -> None:
        import threading

        self.peak_kb, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak_kb = max(self.peak_kb, self._read())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return round(max(self.peak_kb, self._read()) / 1024)


def run_child(stage: str, workdir: Path) -> dict:
    script = Path(__file__).resolve()
    # datasets caches what it loads and maps (by file path and mtime): a first run, the
    # plugin's or Axolotl's, starts without that cache; the plugin's later stages find the one
    # its first run left, as a relaunch does.
    cache = workdir / ("hf-cache-axolotl" if stage == "axolotl" else "hf-cache-plugin")
    if stage in ("data", "axolotl"):
        shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "AXOLOTL_DO_NOT_TRACK": "1",
           "DO_NOT_TRACK": "1"}  # no telemetry retries on a machine without internet
    proc = subprocess.run([sys.executable, str(script), "--child", stage, "--workdir",
                           str(workdir)], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(next(line for line in reversed(proc.stdout.splitlines())
                           if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--kind", choices=("short", "long"), default="short")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        peak_anon = AnonPeak()
        result = child(args.child, args.workdir)
        result["anon_rss_mb"] = peak_anon.stop()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(rss_mb=round(usage.ru_maxrss / 1024), workers_rss_mb=round(
            workers.ru_maxrss / 1024))
        print(json.dumps(result))
        return

    workdir = args.workdir or Path(f"/tmp/tms-data-path-{args.kind}-{args.rows}")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "rows.jsonl"
    if not data.exists():
        write_rows(data, args.rows, args.kind)
    config(workdir, data, args.kind, args.procs, plugin=True)
    config(workdir, data, args.kind, args.procs, plugin=False)
    stages = args.stages.split(",")
    if "data" in stages:
        shutil.rmtree(workdir / "out", ignore_errors=True)
    entry = {"rows": args.rows, "kind": args.kind, "procs": args.procs,
             "data_mb": round(data.stat().st_size / 2**20), "stages": {},
             "machine": f"{platform.machine()}, {os.cpu_count()} cores",
             "command": "PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python "
                        f"bench/data_path.py --rows {args.rows} --kind {args.kind} "
                        f"--procs {args.procs}"}
    key = f"{args.kind}-{args.rows}"
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    entry["stages"] = results.get(key, {}).get("stages", {}) if args.stages != ",".join(
        STAGES) else {}
    for stage in stages:
        load_before = os.getloadavg()[0]
        entry["stages"][stage] = run_child(stage, workdir)
        # Other work on the machine slows a stage down: the 1-minute load around it says how much.
        entry["stages"][stage]["load_1min"] = [round(load_before, 2),
                                               round(os.getloadavg()[0], 2)]
        print(stage, entry["stages"][stage], flush=True)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results[key] = entry
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table_dir = next((workdir / "out" / "tms" / "data").glob("examples-*"), None)
    if table_dir is not None:
        entry["table_mb"] = round(sum(f.stat().st_size for f in table_dir.iterdir()) / 2**20)
    s = entry["stages"]
    if "data" in s and "axolotl" in s:
        entry["data_vs_axolotl"] = round(s["data"]["seconds"] / s["axolotl"]["seconds"], 3)
    if "data" in s and "data-rerun" in s:
        entry["rerun_vs_first"] = round(s["data-rerun"]["seconds"] / s["data"]["seconds"], 3)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = entry
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(json.dumps(entry, indent=1))
    if not args.keep:
        shutil.rmtree(workdir / "prepared", ignore_errors=True)


if __name__ == "__main__":
    main()
