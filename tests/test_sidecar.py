"""How a launched vLLM server is started (command line, environment, socket directory), and the
IPv6 loopback path, without vLLM: the real-server checks are in test_vllm_sidecar.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tms_axolotl_plugin.config import SidecarConfig
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.sidecar import Endpoint, VLLMSidecar, free_port, http_base, wait_for_health


def sidecar(tmp_path, dev_mode=False, **settings) -> VLLMSidecar:
    return VLLMSidecar(SidecarConfig(**settings), {"dtype": "float32"}, "/models/m",
                       tmp_path / "logs", dev_mode=dev_mode)


def test_launched_server_is_private_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")  # never inherited from the trainer
    server = sidecar(tmp_path)
    try:
        command, env = server.command(), server.environment()
        socket_path = server.endpoint.uds
        assert command[command.index("--uds") + 1] == socket_path
        assert "--host" not in command and "--port" not in command
        assert "--api-key" not in command and server.api_key not in " ".join(command)
        assert env["VLLM_API_KEY"] == server.api_key
        assert "VLLM_SERVER_DEV_MODE" not in env
        directory = os.path.dirname(socket_path)
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert len(socket_path.encode()) < 108  # fits a Unix socket address
    finally:
        server.close()
    assert not os.path.exists(directory)


def test_dev_mode_only_on_the_private_socket(tmp_path):
    private = sidecar(tmp_path, dev_mode=True)
    tcp = sidecar(tmp_path, dev_mode=True, transport="tcp")
    try:
        assert private.environment()["VLLM_SERVER_DEV_MODE"] == "1"
        assert "VLLM_SERVER_DEV_MODE" not in tcp.environment()
        assert tcp.socket_dir is None
        command = tcp.command()
        assert command[command.index("--host") + 1] == "127.0.0.1"
        assert "--api-key" not in command and tcp.environment()["VLLM_API_KEY"] == tcp.api_key
    finally:
        private.close()
        tcp.close()


def test_launched_server_uses_vllms_neutral_sampling_defaults(tmp_path):
    for server in (sidecar(tmp_path), sidecar(tmp_path, transport="tcp")):
        try:
            command = server.command()
            assert command[command.index("--generation-config") + 1] == "vllm"
        finally:
            server.close()


def test_every_request_states_every_sampling_parameter(tmp_path):
    import asyncio
    import json

    import httpx

    from tms_axolotl_plugin.config import TMSConfig
    from tms_axolotl_plugin.generation import GenerationRequest, SamplingSettings
    from tms_axolotl_plugin.vllm_backend import VLLMGenerator

    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"text": "4", "finish_reason": "stop"}],
                                         "usage": {"completion_tokens": 2}})

    backend = VLLMGenerator(TMSConfig(), {}, "/models/m", tmp_path)
    request = GenerationRequest("k", 3, (1, 2, 3), 16)

    async def send(settings):
        async with httpx.AsyncClient(transport=httpx.MockTransport(server),
                                     base_url="http://x") as client:
            return await backend._complete(client, request, "base", settings)

    label = asyncio.run(send(SamplingSettings()))
    assert (label.text, label.finish_reason, label.num_tokens) == ("4", "stop", 2)
    asyncio.run(send(SamplingSettings(greedy=True, repetition_penalty=1.2)))
    neutral = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
               "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    common = {"model": "base", "prompt": [1, 2, 3], "max_tokens": 16,
              "seed": request.seed % (2**31 - 1), "n": 1, "stop": [], "bad_words": [],
              "min_tokens": 0, "ignore_eos": False, "skip_special_tokens": True}
    assert bodies[0] == {**common, **neutral}
    assert bodies[1] == {**common, **neutral, "temperature": 0.0, "repetition_penalty": 1.2}


def test_user_env_cannot_reach_the_key_or_dev_mode(tmp_path):
    with pytest.raises(ValueError, match="VLLM_API_KEY is controlled by the plugin"):
        SidecarConfig(env={"VLLM_API_KEY": "mine"})
    server = sidecar(tmp_path, env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    try:
        assert server.environment()["VLLM_LOGGING_LEVEL"] == "DEBUG"
    finally:
        server.close()


def test_ipv6_loopback_addresses():
    assert http_base("::1", 8000) == "http://[::1]:8000"
    assert http_base("::", 8000) == "http://[::1]:8000"
    assert http_base("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert 0 < free_port("::1") < 65536


def test_health_check_reaches_a_real_server_on_ipv6_loopback(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = free_port("::1")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "::1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        wait_for_health(Endpoint(http_base("::1", port)), timeout_s=30, process=server)
        assert time.monotonic() - started < 30
        with pytest.raises(TMSError, match="did not become healthy"):
            wait_for_health(Endpoint(http_base("::1", free_port("::1"))), timeout_s=2)
    finally:
        server.terminate()
        server.wait(timeout=30)
