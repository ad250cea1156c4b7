"""`VLLMGenerator`: regeneration through a vLLM OpenAI-compatible server.

- LoRA checkpoints: every adapter is loaded into one server and each request names its
  adapter, so all checkpoints are answered in one batched pass.
- Full-weight checkpoints: served one after another. On a launched server on the private
  socket the weights are swapped in place (`reload_weights` through vLLM's dev-mode RPC, then
  the prefix cache is reset); a launched TCP server never gets dev mode and is restarted on the
  next checkpoint instead. Which one was used and what each switch cost is logged and kept in
  `switches`.
- Many requests in flight (`tms.sidecar.concurrency`), token-id prompts (exactly what the
  trainer sees), a seed per request, retries with exponential backoff; if a launched server
  dies, it is restarted and the unanswered requests are sent again.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.fingerprint import model_dir_digest
from tms_axolotl_plugin.generation import GenerationRequest, SamplingSettings
from tms_axolotl_plugin.label_store import GeneratedLabel
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.sidecar import Endpoint, VLLMSidecar, wait_for_health

LOG = get_logger(__name__)
MAX_RESTARTS = 3
SEED_MODULUS = 2**31 - 1


API_KEY_ENV = "TMS_SIDECAR_API_KEY"


def user_server_endpoint(settings) -> Endpoint:
    """The server at `tms.sidecar.url`; its key from the config, else (containers) the
    environment."""
    return Endpoint(settings.url or "", api_key=settings.api_key or os.environ.get(API_KEY_ENV))


@dataclass
class Switch:
    checkpoint: int
    mechanism: str  # "adapter-load", "in-place-reload", "restart", "initial-start"
    seconds: float


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty")


def request_body(request: GenerationRequest, model: str, settings: SamplingSettings) -> dict:
    """One /v1/completions request that states every sampling parameter: a field left out
    would be filled from the server's defaults, i.e. the checkpoint's generation_config.json
    unless the server runs with `--generation-config vllm`. No stop strings, bad words or
    logit bias: the answer ends at the checkpoint's EOS ids (which vLLM reads from
    generation_config.json either way) or at the token cap."""
    params = settings.as_dict()
    return {
        "model": model,
        "prompt": list(request.prompt_ids),
        "max_tokens": request.max_new_tokens,
        "seed": request.seed % SEED_MODULUS,
        "n": 1,
        **{field: params[field] for field in SAMPLING_FIELDS},
        "stop": [],
        "bad_words": [],
        "min_tokens": 0,
        "ignore_eos": False,
        "skip_special_tokens": True,
    }


def _retryable(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, httpx.TransportError)


class VLLMGenerator:
    name = "vllm"

    def __init__(self, tms: TMSConfig, engine: dict, base_model: str, log_dir: Path):
        self.tms = tms
        self.settings = tms.sidecar
        self.engine = engine
        self.base_model = base_model
        self.log_dir = Path(log_dir)
        self.sidecar: VLLMSidecar | None = None
        self.endpoint = user_server_endpoint(self.settings)  # a launched server replaces it
        self.switches: list[Switch] = []
        self.serving: Path | None = None  # the full-weight checkpoint the server has loaded

    @classmethod
    def from_config(cls, cfg, tms: TMSConfig, log_dir: Path | None = None) -> VLLMGenerator:
        engine = dict(cfg.vllm or {})
        if not engine.get("max_model_len"):
            engine["max_model_len"] = cfg.sequence_len
        log_dir = log_dir or Path(cfg.output_dir) / "tms" / "sidecar"
        return cls(tms, engine, str(cfg.base_model), log_dir)

    # -- server ------------------------------------------------------------------------------
    def _launch(self, model: str, lora_rank: int | None = None, max_loras: int = 1) -> None:
        if self.sidecar is None:
            # Dev mode only where it is used: full weights reloaded in place (never for LoRA).
            self.sidecar = VLLMSidecar(self.settings, self.engine, model, self.log_dir,
                                       lora_rank=lora_rank, max_loras=max_loras,
                                       dev_mode=lora_rank is None)
        self.sidecar.start(model)
        self.endpoint = self.sidecar.endpoint

    def _served_model(self) -> str:
        with self.endpoint.client(timeout=30) as client:
            response = client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    def _post(self, route: str, body: dict) -> httpx.Response:
        with self.endpoint.client(timeout=600) as client:
            return client.post(route, json=body)

    def _load_adapters(self, jobs: list[tuple[int, Path]]) -> dict[int, str]:
        names = {}
        for checkpoint, path in jobs:
            started = time.perf_counter()
            name = f"tms-ckpt{checkpoint}-{model_dir_digest(path)[:8]}"
            response = self._post("/v1/load_lora_adapter",
                                  {"lora_name": name, "lora_path": str(path)})
            if response.status_code != 200 and "already" not in response.text:
                raise TMSError(f"vLLM refused LoRA adapter {path} ({response.status_code}: "
                               f"{response.text[:300]}); the server needs --enable-lora and "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
            self.switches.append(Switch(checkpoint, "adapter-load",
                                        time.perf_counter() - started))
            names[checkpoint] = name
        return names

    def _serve_full_weights(self, checkpoint: int, path: Path, first: bool) -> str:
        """Make the server serve `path`; returns the model name to request."""
        if self.serving == path and (self.sidecar is None or self.sidecar.alive()):
            return self._served_model()
        started = time.perf_counter()
        if self.sidecar is None and self.settings.url is None:
            self._launch(str(path))
            mechanism = "initial-start"
        elif first and self.sidecar is not None and not self.sidecar.alive():
            self._launch(str(path))
            mechanism = "initial-start"
        else:
            # A launched server without dev mode (TCP) is restarted: no RPC route to try.
            can_reload = self.sidecar is None or self.sidecar.dev_mode
            mechanism = "in-place-reload" if can_reload and self._reload_in_place(path) else None
            if mechanism is None:
                if self.sidecar is None:
                    raise TMSError(
                        f"the vLLM server at {self.endpoint} cannot switch to full-weight "
                        f"checkpoint {path} in place (the server needs VLLM_SERVER_DEV_MODE=1 "
                        "for that); use LoRA checkpoints with a user-provided server, or let "
                        "the plugin launch the server (leave tms.sidecar.url unset)")
                self._launch(str(path))
                mechanism = "restart"
        seconds = time.perf_counter() - started
        self.serving = path
        self.switches.append(Switch(checkpoint, mechanism, seconds))
        LOG.info("tms sidecar: checkpoint %d served by %s in %.1fs", checkpoint, mechanism,
                 seconds)
        return self._served_model()

    def _reload_in_place(self, path: Path) -> bool:
        try:
            response = self._post("/collective_rpc", {
                "method": "reload_weights", "kwargs": {"weights_path": str(path)}})
            if response.status_code != 200:
                return False
            self._post("/reset_prefix_cache", {})
            return True
        except httpx.HTTPError:
            return False

    # -- generation --------------------------------------------------------------------------
    def generate(self, checkpoint_path, requests, settings):
        yield from self.generate_many([(Path(checkpoint_path), requests)], settings)

    def generate_many(self, jobs: list[tuple[Path, list[GenerationRequest]]],
                      settings: SamplingSettings) -> Iterator[list[GeneratedLabel]]:
        jobs = [(Path(path), reqs) for path, reqs in jobs if reqs]
        if not jobs:
            return
        if self.settings.url:
            wait_for_health(self.endpoint, 30)
        adapters = [(path / "adapter_config.json").exists() for path, _ in jobs]
        if all(adapters):
            yield from self._generate_lora(jobs, settings)
        elif not any(adapters):
            for index, (path, requests) in enumerate(jobs):
                model = self._serve_full_weights(requests[0].checkpoint, path, index == 0)
                yield from self._generate_requests({r: model for r in requests}, settings,
                                                   lambda: self._serve_full_weights(
                                                       requests[0].checkpoint, path, True))
        else:
            raise TMSError("the harvested checkpoints mix LoRA adapters and full weights")

    def _generate_lora(self, jobs, settings):
        rank = max(json.loads((path / "adapter_config.json").read_text()).get("r", 8)
                   for path, _ in jobs)
        if self.settings.url is None:
            self._launch(self.base_model, lora_rank=rank, max_loras=len(jobs))
        checkpoints = [(reqs[0].checkpoint, path) for path, reqs in jobs]
        names = self._load_adapters(checkpoints)
        LOG.info("tms sidecar: %d LoRA adapters loaded into one server (%.2fs in all)",
                 len(names), sum(s.seconds for s in self.switches if s.mechanism == "adapter-load"))
        routed = {r: names[r.checkpoint] for _, reqs in jobs for r in reqs}

        def recover():
            self._launch(self.base_model, lora_rank=rank, max_loras=len(jobs))
            names.update(self._load_adapters(checkpoints))

        yield from self._generate_requests(routed, settings, recover)

    def _generate_requests(self, routed: dict[GenerationRequest, str], settings,
                           recover) -> Iterator[list[GeneratedLabel]]:
        """Send requests in chunks with many in flight; restart a dead launched server."""
        pending = sorted(routed, key=lambda r: (r.checkpoint, r.prompt_key))
        chunk_size = max(4 * self.settings.concurrency, 64)
        restarts = 0
        while pending:
            chunk, pending = pending[:chunk_size], pending[chunk_size:]
            done, failed = asyncio.run(self._run_chunk(chunk, routed, settings))
            if done:
                yield done
            if failed:
                dead = self.sidecar is not None and not self.sidecar.alive()
                if not dead or restarts >= MAX_RESTARTS:
                    raise TMSError(f"{len(failed)} generation requests failed at "
                                   f"{self.endpoint}: {failed[0][1]}")
                restarts += 1
                LOG.warning("tms sidecar: the vLLM server died; restarting (%d/%d) and sending "
                            "%d unanswered requests again", restarts, MAX_RESTARTS, len(failed))
                recover()
                pending = [r for r, _ in failed] + pending

    async def _run_chunk(self, chunk, routed, settings):
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        limits = httpx.Limits(max_connections=self.settings.concurrency)
        timeout = httpx.Timeout(self.settings.request_timeout_s, connect=10)
        async with self.endpoint.async_client(timeout=timeout, limits=limits) as client:
            async def one(request: GenerationRequest):
                async with semaphore:
                    try:
                        return await self._complete(client, request, routed[request], settings)
                    except Exception as error:  # reported per request, handled by the caller
                        return error

            results = await asyncio.gather(*(one(r) for r in chunk))
        done = [r for r in results if isinstance(r, GeneratedLabel)]
        failed = [(req, res) for req, res in zip(chunk, results, strict=True)
                  if not isinstance(res, GeneratedLabel)]
        return done, failed

    async def _complete(self, client, request: GenerationRequest, model: str,
                        settings: SamplingSettings) -> GeneratedLabel:
        body = request_body(request, model, settings)
        attempts = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_retries + 1),
            wait=wait_exponential(multiplier=0.5, max=20),
            retry=retry_if_exception(_retryable), reraise=True)
        async for attempt in attempts:
            with attempt:
                if self.sidecar is not None and not self.sidecar.alive():
                    raise TMSError("the vLLM server is not running")
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()
        payload = response.json()
        choice = payload["choices"][0]
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        tokens = payload.get("usage", {}).get("completion_tokens", 0)
        return GeneratedLabel(request.prompt_key, request.checkpoint, choice["text"], finish,
                              tokens, len(request.prompt_ids))

    def close(self) -> None:
        if self.sidecar is not None:
            self.sidecar.close()
        if self.switches:
            LOG.info("tms sidecar: checkpoint switches: %s", ", ".join(
                f"{s.checkpoint}:{s.mechanism} {s.seconds:.1f}s" for s in self.switches))
