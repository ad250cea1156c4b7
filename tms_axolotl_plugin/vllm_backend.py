"""`VLLMGenerator`: regeneration through a vLLM OpenAI-compatible server.

- LoRA checkpoints: every adapter is loaded into one server and each request names its
  adapter, so all checkpoints are answered in one batched pass.
- Full-weight checkpoints: served one after another. On a launched server on the private
  socket the weights are swapped in place (`reload_weights` through vLLM's dev-mode RPC, then
  the prefix cache is reset); a launched TCP server never gets dev mode and is restarted on the
  next checkpoint instead. Which one was used and what each switch cost is logged and kept in
  `switches`.
- A window of `tms.sidecar.concurrency` requests in flight, topped up as each one completes
  (nothing waits for the slowest of a group), so the engine's batch stays full; the caller's
  requests are pulled only as the window frees up, and answers are handed back in batches as
  they arrive. Token-id prompts (exactly what the trainer sees), a seed per request, retries
  with exponential backoff; if a launched server dies, it is restarted and the requests that
  were in flight are sent again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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
FLUSH_ANSWERS = 256  # answers handed to the caller at once (plus any that complete with them)
FLUSH_SECONDS = 1.0  # ... or fewer, once the oldest of them has waited this long
PENDING_BATCHES = 4  # batches the caller may fall behind before the window stops refilling


API_KEY_ENV = "TMS_SIDECAR_API_KEY"


def user_server_endpoint(settings, url: str | None = None) -> Endpoint:
    """The user-run server at `url` (default: `tms.sidecar.url`); its key from the config, else
    (containers) the environment."""
    return Endpoint(url or settings.url or "",
                    api_key=settings.api_key or os.environ.get(API_KEY_ENV))


@dataclass
class Switch:
    checkpoint: int
    mechanism: str  # "adapter-load", "in-place-reload", "restart", "initial-start"
    seconds: float


@dataclass
class InFlightStats:
    """How full the client kept its window of `window` requests during one `generate_many`
    call. A request is in flight from when it is taken until its answer (or failure) is in;
    the mean is over the time while requests remained to be sent, so it shows what the gap
    between a completion and its replacement costs."""

    window: int
    answered: int = 0
    resent: int = 0  # in flight when a launched server died, sent again
    count: int = 0  # in flight now
    max_count: int = 0
    refills: int = 0  # window top-ups while requests remained ...
    short_refills: int = 0  # ... that left fewer than `window` in flight
    busy_seconds: float = 0.0  # time while requests remained
    count_seconds: float = 0.0  # the in-flight count integrated over that time
    _remaining: bool = field(default=False, repr=False)
    _since: float = field(default_factory=time.monotonic, repr=False)

    @property
    def mean_count(self) -> float:
        return self.count_seconds / self.busy_seconds if self.busy_seconds else 0.0

    def _advance(self) -> None:
        now = time.monotonic()
        if self._remaining:
            self.busy_seconds += now - self._since
            self.count_seconds += self.count * (now - self._since)
        self._since = now

    def started(self) -> None:
        self._advance()
        self.count += 1
        self.max_count = max(self.max_count, self.count)

    def finished(self) -> None:
        self._advance()
        self.count -= 1

    def refilled(self, remaining: bool) -> None:
        self._advance()
        self._remaining = remaining
        if remaining:
            self.refills += 1
            self.short_refills += self.count < self.window


@dataclass
class _Job:
    """One checkpoint's requests, the first already looked at (it names the checkpoint)."""

    path: Path
    checkpoint: int
    requests: Iterator[GenerationRequest]

    @classmethod
    def peek(cls, job: tuple[Path, Iterable[GenerationRequest]]) -> _Job | None:
        path, requests = job
        requests = iter(requests)
        first = next(requests, None)
        if first is None:
            return None
        return cls(Path(path), first.checkpoint, itertools.chain([first], requests))


class _Handoff:
    """Batches of answers from the client's event loop (its own thread) to the caller's. The
    loop waits once the caller is `PENDING_BATCHES` behind, so answers cannot pile up: the
    window stops refilling until the caller catches up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.room = asyncio.Semaphore(PENDING_BATCHES)  # bound to `loop` on first use

    async def put(self, batch: list[GeneratedLabel]) -> None:
        await self.room.acquire()
        self.queue.put(batch)

    def put_now(self, batch: list[GeneratedLabel]) -> None:
        """The last batch before an error: no waiting."""
        if batch:
            self.queue.put(batch)

    def finish(self, error: BaseException | None) -> None:
        self.queue.put(("end", error))

    def get(self) -> list[GeneratedLabel] | None:
        """The next batch (blocking); None at the end; the client's error, raised."""
        item = self.queue.get()
        if not isinstance(item, list):
            if item[1] is not None:
                raise item[1]
            return None
        self.loop.call_soon_threadsafe(self.room.release)
        return item


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
        self.in_flight = InFlightStats(tms.sidecar.concurrency)  # of the last generate_many

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
        if (self.sidecar is None and self.settings.url is None) or (
                first and self.sidecar is not None and not self.sidecar.alive()):
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

    def generate_many(self, jobs: list[tuple[Path, Iterable[GenerationRequest]]],
                      settings: SamplingSettings) -> Iterator[list[GeneratedLabel]]:
        """Answer (checkpoint, requests) jobs. Each job's requests (any iterable, e.g. a
        one-shot generator) are pulled only as the window frees up, on the client's own thread;
        answers come back in batches as they arrive, in no particular order."""
        self.in_flight = InFlightStats(self.settings.concurrency)
        jobs = [job for job in map(_Job.peek, jobs) if job is not None]
        if not jobs:
            return
        if self.settings.url:
            wait_for_health(self.endpoint, 30)
        adapters = [(job.path / "adapter_config.json").exists() for job in jobs]
        if all(adapters):
            yield from self._generate_lora(jobs, settings)
        elif not any(adapters):
            for index, job in enumerate(jobs):
                yield from self._generate_full_weights(job, index == 0, settings)
        else:
            raise TMSError("the harvested checkpoints mix LoRA adapters and full weights")
        stats = self.in_flight
        LOG.info("tms sidecar: %d answers; %.1f of %d requests in flight on average while "
                 "requests remained (at most %d)", stats.answered, stats.mean_count,
                 stats.window, stats.max_count)

    def _generate_full_weights(self, job: _Job, first: bool, settings):
        model = self._serve_full_weights(job.checkpoint, job.path, first)

        def route(request: GenerationRequest) -> str:
            if request.checkpoint != job.checkpoint:
                raise TMSError(f"a request for checkpoint {request.checkpoint} came in the "
                               f"requests of checkpoint {job.checkpoint} ({job.path})")
            return model

        def recover():
            self._serve_full_weights(job.checkpoint, job.path, True)

        yield from self._answer(job.requests, route, settings, recover)

    def _generate_lora(self, jobs: list[_Job], settings):
        rank = max(json.loads((job.path / "adapter_config.json").read_text()).get("r", 8)
                   for job in jobs)
        if self.settings.url is None:
            self._launch(self.base_model, lora_rank=rank, max_loras=len(jobs))
        checkpoints = [(job.checkpoint, job.path) for job in jobs]
        names = self._load_adapters(checkpoints)
        LOG.info("tms sidecar: %d LoRA adapters loaded into one server (%.2fs in all)",
                 len(names), sum(s.seconds for s in self.switches if s.mechanism == "adapter-load"))

        def route(request: GenerationRequest) -> str:
            if request.checkpoint not in names:
                raise TMSError(f"a request for checkpoint {request.checkpoint} came in the "
                               f"requests of checkpoints {sorted(names)}")
            return names[request.checkpoint]

        def recover():
            self._launch(self.base_model, lora_rank=rank, max_loras=len(jobs))
            names.update(self._load_adapters(checkpoints))

        # One window for every adapter: each request names its own.
        requests = itertools.chain.from_iterable(job.requests for job in jobs)
        yield from self._answer(requests, route, settings, recover)

    def _answer(self, requests: Iterator[GenerationRequest], route, settings,
                recover) -> Iterator[list[GeneratedLabel]]:
        """Run the client (`_pump`) on an event loop in a thread of its own, so the window
        stays full while the caller stores answers; hand its batches to the caller. Its errors
        are raised here; closing this generator early stops it."""
        loop = asyncio.new_event_loop()
        handoff = _Handoff(loop)
        task = loop.create_task(self._pump(requests, route, settings, recover, handoff))

        def run():
            try:
                loop.run_until_complete(task)
            except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
                handoff.finish(error)
            else:
                handoff.finish(None)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())

        thread = threading.Thread(target=run, name="tms-vllm-client", daemon=True)
        thread.start()
        try:
            while (batch := handoff.get()) is not None:
                yield batch
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join()
            loop.close()

    async def _pump(self, requests: Iterator[GenerationRequest],
                    route: Callable[[GenerationRequest], str], settings: SamplingSettings,
                    recover: Callable[[], None], handoff: _Handoff) -> None:
        """Keep `concurrency` requests in flight, topping the window up as each completes.
        A failed request stops the refills; once the rest are in, a dead launched server is
        restarted and the failed ones are sent again, anything else is an error."""
        window, stats = self.settings.concurrency, self.in_flight
        in_flight: dict[asyncio.Task, GenerationRequest] = {}
        resend: deque[GenerationRequest] = deque()  # in flight when the server died
        answers: list[GeneratedLabel] = []
        oldest = 0.0  # when the oldest of `answers` arrived
        failures: list[tuple[GenerationRequest, BaseException]] = []
        exhausted, restarts = False, 0
        client = self._async_client()

        async def counted(client, request, model):  # in flight until its coroutine ends
            try:
                return await self._complete(client, request, model, settings)
            finally:
                stats.finished()

        try:
            while True:
                while not failures and len(in_flight) < window and (resend or not exhausted):
                    request = resend.popleft() if resend else next(requests, None)
                    if request is None:
                        exhausted = True
                        break
                    task = asyncio.create_task(counted(client, request, route(request)))
                    stats.started()
                    in_flight[task] = request
                stats.refilled(remaining=bool(resend) or not exhausted)
                if not in_flight:
                    if answers:
                        await handoff.put(answers)
                        answers = []
                    if not failures:
                        return
                    dead = self.sidecar is not None and not self.sidecar.alive()
                    if not dead or restarts >= MAX_RESTARTS:
                        raise TMSError(f"{len(failures)} generation requests failed at "
                                       f"{self.endpoint}: {failures[0][1]}")
                    restarts += 1
                    LOG.warning("tms sidecar: the vLLM server died; restarting (%d/%d) and "
                                "sending the %d requests that were in flight again", restarts,
                                MAX_RESTARTS, len(failures))
                    await client.aclose()
                    recover()
                    client = self._async_client()
                    resend.extend(request for request, _ in failures)
                    stats.resent += len(failures)
                    failures = []
                    continue
                timeout = max(0.0, oldest + FLUSH_SECONDS - time.monotonic()) if answers else None
                done, _ = await asyncio.wait(in_flight, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    request = in_flight.pop(task)
                    if task.exception() is not None:
                        failures.append((request, task.exception()))
                        continue
                    if not answers:
                        oldest = time.monotonic()
                    answers.append(task.result())
                    stats.answered += 1
                if answers and (len(answers) >= FLUSH_ANSWERS
                                or time.monotonic() - oldest >= FLUSH_SECONDS):
                    await handoff.put(answers)
                    answers = []
        except Exception:
            handoff.put_now(answers)  # what was answered is kept, whatever failed after it
            raise
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await client.aclose()

    def _async_client(self) -> httpx.AsyncClient:
        """A connection per request of the window, kept alive between requests."""
        window = self.settings.concurrency
        limits = httpx.Limits(max_connections=window, max_keepalive_connections=window)
        timeout = httpx.Timeout(self.settings.request_timeout_s, connect=10)
        return self.endpoint.async_client(timeout=timeout, limits=limits)

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
