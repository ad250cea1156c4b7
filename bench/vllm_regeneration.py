"""Regeneration throughput: the plugin's vLLM client vs the same prompts sent straight to the
same server, vs the in-process transformers backend; and checkpoint switch costs.

    TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 \
    flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python bench/vllm_regeneration.py \
        [--prompts 96] [--max-new-tokens 64] [--max-num-seqs 32] [--rounds 3] [--headroom]

Model: SmolLM2-135M-Instruct (fp32), GSM8K-train questions; one launched server (private
socket) whose engine runs at most `--max-num-seqs` sequences at once.
- plugin: `VLLMGenerator.generate` with a window of exactly `--max-num-seqs` requests in
  flight, topped up as each answer arrives: the server has no queue of its own to refill from,
  so every gap between a completion and the request that replaces it shows. One request per
  prompt with its own seed, retries, answers handed back in batches; three times more prompts
  than the window, so it is refilled all the time. `--headroom` adds a run with a window of
  twice the engine's batch: the server then refills from a queue of its own.
- direct: one `/v1/completions` request carrying every prompt: the server queues them and
  refills its batch itself, the best the engine can do with these prompts. Its sequences are
  sampled with one seed, so they are not the plugin's tokens, and their lengths differ.
- direct_same_requests: every request the plugin sends (its bodies, its seeds) posted at
  once: the server queues them all and refills its batch itself, and samples exactly the
  plugin's tokens, so the two runs do the same work and differ only in how the client feeds
  the engine. This is the baseline of the headline ratio.
- They alternate, `--rounds` times (the order swapped every round), with the prefix cache reset
  before each run so none reuses another's prefills. tokens/s is what the issue asks about, but
  on a shared 2-CPU machine identical runs differ by up to ~30% with the other load, so each
  round's plugin/direct ratio is kept (adjacent runs see similar load) and the headline is
  their median. The load-independent measure of how full the client keeps the engine is the
  engine's own count (its /metrics): answer tokens per engine step, i.e. sequences advanced per
  step; `engine_batch_ratio` compares the two. (On CPU the ~130-token prompts' prefill costs
  about as much as the answers' decode, and it is the same work on both paths.)
- transformers: `HFGenerator` (batch 16) on the first `--hf-prompts` prompts.
- switches: in-place weight reload (or restart) to a second full-weight checkpoint.
Writes bench/results/vllm_regeneration.json, with the command that produced it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import httpx

from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.generation import (
    GenerationRequest,
    HFGenerator,
    SamplingSettings,
)
from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir
from tms_axolotl_plugin.vllm_backend import VLLMGenerator, request_body

RESULTS = Path(__file__).parent / "results" / "vllm_regeneration.json"
ENV = ("TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 "
       "flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python")
ENGINE_COUNTERS = {"vllm:generation_tokens_total": "answer_tokens",
                   "vllm:iteration_tokens_total_count": "engine_steps"}


def engine_counters(backend: VLLMGenerator) -> dict[str, float]:
    with backend.endpoint.client(timeout=30) as client:
        response = client.get("/metrics")
    response.raise_for_status()
    counters = dict.fromkeys(ENGINE_COUNTERS.values(), 0.0)
    for line in response.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ENGINE_COUNTERS:
            counters[ENGINE_COUNTERS[name]] += float(line.rsplit(" ", 1)[1])
    return counters


def measured(backend: VLLMGenerator, run) -> dict:
    """One timed run on a cold prefix cache, with what the engine did meanwhile."""
    response = backend._post("/reset_prefix_cache", {})  # no run reuses another's prefills
    assert response.status_code == 200, response.text
    before = engine_counters(backend)
    started = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - started
    after = engine_counters(backend)
    steps = after["engine_steps"] - before["engine_steps"]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "engine_steps": steps,
            "seqs_per_engine_step": (after["answer_tokens"] - before["answer_tokens"]) / steps}


def summary(runs: list[dict]) -> dict:
    return {"seconds": mean(r["seconds"] for r in runs),
            "tokens": round(mean(r["tokens"] for r in runs)),
            "tokens_per_s": mean(r["tokens_per_s"] for r in runs),
            "seqs_per_engine_step": mean(r["seqs_per_engine_step"] for r in runs), "runs": runs}


def compared(runs: dict[str, list[dict]], path: str, baseline: str) -> dict:
    """`path` against `baseline`: tokens/s ratio per round (adjacent runs, similar load), its
    median, and the ratio of sequences the engine advanced per step."""
    by_round = [p["tokens_per_s"] / b["tokens_per_s"]
                for p, b in zip(runs[path], runs[baseline], strict=True)]
    batch = (mean(r["seqs_per_engine_step"] for r in runs[path])
             / mean(r["seqs_per_engine_step"] for r in runs[baseline]))
    return {"by_round": by_round, "median": median(by_round), "engine_batch_ratio": batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--headroom", action="store_true",
                        help="also run the plugin with a window of twice --max-num-seqs")
    parser.add_argument("--hf-prompts", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in gsm8k_jsonl("train").read_text().splitlines()]
    prompts = [tuple(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
               for row in rows[: args.prompts]]
    requests = [GenerationRequest(f"p{i}", 1, ids, args.max_new_tokens)
                for i, ids in enumerate(prompts)]
    settings = SamplingSettings(temperature=1.0, top_p=1.0)
    tms = TMSConfig.model_validate({"generation": {"backend": "vllm"}, "sidecar": {
        "python": os.environ["TMS_SIDECAR_PYTHON"], "concurrency": args.max_num_seqs,
        "extra_args": ["--max-num-seqs", str(args.max_num_seqs)]}})
    workdir = Path(tempfile.mkdtemp(prefix="tms-vllm-bench-"))
    backend = VLLMGenerator(tms, {"dtype": "float32", "max_model_len": 2048,
                                  "enforce_eager": True}, str(model), workdir / "sidecar")
    windows = {"plugin": args.max_num_seqs}
    if args.headroom:
        windows["plugin_2x_window"] = 2 * args.max_num_seqs
    result: dict = {
        "command": f"{ENV} {shlex.join(['bench/vllm_regeneration.py', *sys.argv[1:]])}",
        "model": "SmolLM2-135M-Instruct fp32", "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "server_max_num_seqs": args.max_num_seqs,
        "windows": windows, "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "load_average_at_start": os.getloadavg()}

    def plugin(window: int):
        def run() -> int:
            backend.settings = backend.settings.model_copy(update={"concurrency": window})
            return sum(label.num_tokens for batch in backend.generate(model, requests, settings)
                       for label in batch)
        return run

    def direct() -> int:
        body = {"model": "base", "prompt": [list(p) for p in prompts],
                "max_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "seed": 1}
        with backend.endpoint.client(timeout=3600) as client:
            response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    def direct_same_requests() -> int:
        async def post_all() -> list:
            limits = httpx.Limits(max_connections=len(requests),
                                  max_keepalive_connections=len(requests))
            async with backend.endpoint.async_client(
                    timeout=httpx.Timeout(3600, connect=10), limits=limits) as client:
                return await asyncio.gather(*(
                    client.post("/v1/completions", json=request_body(r, model_name, settings))
                    for r in requests))
        responses = asyncio.run(post_all())
        for response in responses:
            response.raise_for_status()
        return sum(r.json()["usage"]["completion_tokens"] for r in responses)

    baselines = {"direct": direct, "direct_same_requests": direct_same_requests}
    runs: dict[str, list[dict]] = {name: [] for name in (*windows, *baselines)}
    try:
        # Warm-up (server start) outside the timing.
        list(backend.generate(model, requests[:2], settings))
        model_name = backend._served_model()
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                run = baselines[name] if name in baselines else plugin(windows[name])
                runs[name].append(measured(backend, run))
                if name not in baselines:
                    stats = backend.in_flight
                    runs[name][-1]["mean_in_flight"] = stats.mean_count
                    runs[name][-1]["max_in_flight"] = stats.max_count
                print(f"round {round_} {name:16} {runs[name][-1]}", flush=True)
        for name, measurements in runs.items():
            result[name] = summary(measurements)
        result["same_tokens_as_plugin"] = [
            p["tokens"] == d["tokens"]
            for p, d in zip(runs["plugin"], runs["direct_same_requests"], strict=True)]
        for baseline, suffix in (("direct_same_requests", ""), ("direct", "_one_request")):
            c = compared(runs, "plugin", baseline)
            result[f"plugin_over_direct{suffix}_by_round"] = c["by_round"]
            result[f"plugin_over_direct{suffix}"] = c["median"]
            result[f"engine_batch_ratio{suffix}"] = c["engine_batch_ratio"]
        if args.headroom:
            c = compared(runs, "plugin_2x_window", "direct_same_requests")
            result["plugin_2x_window_over_direct"] = c["median"]
            result["plugin_2x_window_engine_batch_ratio"] = c["engine_batch_ratio"]

        # Switch to a second full-weight checkpoint (a copy: same weights, new path).
        second = workdir / "checkpoint-2"
        shutil.copytree(model, second)
        list(backend.generate_many([(second, [GenerationRequest("s", 2, prompts[0], 4)])],
                                   settings))
        result["full_weight_switch"] = [vars(s) for s in backend.switches]
    finally:
        backend.close()

    if not args.skip_hf:
        hf = HFGenerator(batch_size=16, dtype="float32")
        started = time.perf_counter()
        tokens = sum(label.num_tokens for batch in hf.generate(
            model, requests[: args.hf_prompts], settings) for label in batch)
        seconds = time.perf_counter() - started
        result["transformers"] = {"prompts": args.hf_prompts, "seconds": seconds,
                                  "tokens": tokens, "tokens_per_s": tokens / seconds}
        result["vllm_over_transformers"] = (result["plugin"]["tokens_per_s"]
                                            / result["transformers"]["tokens_per_s"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for key in (*windows, *baselines, "transformers"):
        if key in result:
            r = result[key]
            batch = (f" {r['seqs_per_engine_step']:5.1f} seqs/engine step"
                     if "seqs_per_engine_step" in r else "")
            print(f"{key:16} {r['tokens']:7d} tokens {r['seconds']:8.1f}s "
                  f"{r['tokens_per_s']:8.1f} tok/s{batch}")
    print(f"plugin/direct (same requests) = {result['plugin_over_direct']:.3f} (median of "
          "rounds: " + ", ".join(f"{r:.3f}" for r in result["plugin_over_direct_by_round"])
          + f"); engine batch plugin/direct = {result['engine_batch_ratio']:.3f}; same tokens: "
          f"{result['same_tokens_as_plugin']}")
    print(f"plugin/direct (one request) = {result['plugin_over_direct_one_request']:.3f}")
    if args.headroom:
        print(f"plugin with a 2x window / direct = {result['plugin_2x_window_over_direct']:.3f}; "
              f"engine batch = {result['plugin_2x_window_engine_batch_ratio']:.3f}")
    if "vllm_over_transformers" in result:
        print(f"vLLM (plugin) / transformers = {result['vllm_over_transformers']:.2f}")
    print("switches:", result["full_weight_switch"])
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
