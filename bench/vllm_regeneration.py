"""Regeneration throughput: the plugin's vLLM path vs the same prompts sent straight to the same
server, vs the in-process transformers backend; and checkpoint switch costs.

    TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python \
    python bench/vllm_regeneration.py [--prompts 64] [--max-new-tokens 128]

(trainer venv, PYTHONPATH=.). Model: SmolLM2-135M-Instruct (fp32), GSM8K-train questions.
- plugin: `VLLMGenerator.generate` (chunks, concurrency, per-request seeds, retries);
- direct: one `/v1/completions` request carrying every prompt (the server batches them all);
- transformers: `HFGenerator` on the same checkpoint and prompts;
- switches: in-place weight reload (or restart) to a second full-weight checkpoint, and LoRA
  adapter loads. Writes bench/results/vllm_regeneration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.generation import GenerationRequest, HFGenerator, SamplingSettings
from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir
from tms_axolotl_plugin.vllm_backend import VLLMGenerator

RESULTS = Path(__file__).parent / "results" / "vllm_regeneration.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
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
        "python": os.environ["TMS_SIDECAR_PYTHON"], "concurrency": 64}})
    workdir = Path(tempfile.mkdtemp(prefix="tms-vllm-bench-"))
    backend = VLLMGenerator(tms, {"dtype": "float32", "max_model_len": 2048,
                                  "enforce_eager": True}, str(model), workdir / "sidecar")
    result: dict = {"model": "SmolLM2-135M-Instruct fp32", "prompts": args.prompts,
                    "max_new_tokens": args.max_new_tokens,
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"}
    try:
        # Warm-up (server start) outside the timing.
        list(backend.generate(model, requests[:2], settings))
        started = time.perf_counter()
        labels = [label for batch in backend.generate(model, requests, settings)
                  for label in batch]
        seconds = time.perf_counter() - started
        tokens = sum(label.num_tokens for label in labels)
        result["plugin"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}

        body = {"model": "base", "prompt": [list(p) for p in prompts],
                "max_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "seed": 1}
        started = time.perf_counter()
        with backend.endpoint.client(timeout=3600) as client:
            response = client.post("/v1/completions", json=body)
        response.raise_for_status()
        seconds = time.perf_counter() - started
        tokens = response.json()["usage"]["completion_tokens"]
        result["direct"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
        result["plugin_over_direct"] = (result["plugin"]["tokens_per_s"]
                                        / result["direct"]["tokens_per_s"])

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
        labels = [label for batch in hf.generate(model, requests, settings) for label in batch]
        seconds = time.perf_counter() - started
        tokens = sum(label.num_tokens for label in labels)
        result["transformers"] = {"seconds": seconds, "tokens": tokens,
                                  "tokens_per_s": tokens / seconds}
        result["vllm_over_transformers"] = (result["plugin"]["tokens_per_s"]
                                            / result["transformers"]["tokens_per_s"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("plugin", "direct", "transformers"):
        if key in result:
            r = result[key]
            print(f"{key:13} {r['tokens']:7d} tokens {r['seconds']:8.1f}s "
                  f"{r['tokens_per_s']:8.1f} tok/s")
    print(f"plugin/direct = {result['plugin_over_direct']:.3f}")
    if "vllm_over_transformers" in result:
        print(f"vLLM (plugin) / transformers = {result['vllm_over_transformers']:.2f}")
    print("switches:", result["full_weight_switch"])
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
