"""The `tms:` config block: one pydantic model that validates the block and documents it.

Axolotl merges `TMSArgs` into its own config model (see `TMSPlugin.get_input_args`), so every
check here runs when Axolotl loads the YAML, before any model or dataset is touched. The
descriptions on the fields are the reference documentation (README's table is generated from
them by `tms_axolotl_plugin.docs`).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback_host(host: str) -> bool:
    """True for names/addresses that never leave this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    """A `tms:` (sub)section: unknown keys are errors, with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise ValueError(
                        f"unknown key '{key}' in this `tms` section.{hint} "
                        f"Allowed keys: {', '.join(sorted(known))}."
                    )
        return data


class GenerationConfig(_Section):
    """How harvested checkpoints answer the training prompts (the regenerate stage)."""

    backend: Literal["hf", "vllm"] = Field(
        default="hf",
        description="Generation engine: `hf` = in-process transformers generate (CPU, small "
        "models); `vllm` = an OpenAI-compatible vLLM server (see `tms.sidecar`).",
    )
    temperature: float = Field(
        default=1.0,
        gt=0,
        description="Sampling temperature. 1.0 samples the checkpoint's own policy, as the "
        "method prescribes; must be > 0 (greedy decoding is not a sample).",
    )
    top_p: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Nucleus-sampling mass in (0, 1]. 1.0 keeps the full distribution.",
    )
    # Every sampling parameter is stated with each request, so nothing is left to the
    # checkpoint's generation_config.json (Qwen2.5-Instruct ships top_k 20, repetition_penalty
    # 1.05): the defaults below are the neutral values, a plain sample of the policy.
    top_k: int = Field(
        default=0,
        ge=0,
        description="Keep only the k most likely tokens; 0 = off (the method's setting). Any "
        "other value departs from TMS, which trains on plain samples of each checkpoint's "
        "policy.",
    )
    min_p: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Drop tokens less likely than min_p times the most likely one; 0 = off (the "
        "method's setting). Any other value departs from TMS (plain samples of the policy).",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0,
        description="Divide the logits of tokens already in the prompt or answer by this; 1.0 = "
        "off (the method's setting). Any other value departs from TMS (plain samples of the "
        "policy). The checkpoint's own generation_config.json is never applied.",
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2,
        le=2,
        description="Subtracted from the logits of tokens already in the answer; 0 = off (the "
        "method's setting). Any other value departs from TMS (plain samples of the policy).",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2,
        le=2,
        description="Subtracted from a token's logit per earlier occurrence in the answer; 0 = "
        "off (the method's setting). Any other value departs from TMS (plain samples of the "
        "policy).",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Cap on generated answer tokens. Default: `sequence_len` minus the prompt "
        "length, so every kept answer fits the training sequence.",
    )
    all_checkpoints: bool = Field(
        default=False,
        description="Generate an answer from every checkpoint for every prompt (T per prompt) "
        "instead of only the (prompt, checkpoint) pairs the student will actually see.",
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Requests the `hf` backend decodes at once: a finished answer's place goes "
        "to the next request (continuous batching), so this many stay in flight until the "
        "requests run out (the `vllm` backend keeps `tms.sidecar.concurrency` requests in "
        "flight instead).",
    )


# Server settings the plugin owns: overriding them through `extra_args`/`env` would undo the
# private socket, the key or the dev-mode rule. Flags are matched as argparse does: with `_` or
# `-`, with `=value`, and abbreviated (vLLM's parser accepts any unique prefix).
PROTECTED_SERVER_FLAGS = {
    "--host": "tms.sidecar.host (with tms.sidecar.transport: tcp)",
    "--port": "tms.sidecar.port (with tms.sidecar.transport: tcp)",
    "--uds": "tms.sidecar.transport (the plugin creates the socket)",
    "--api-key": "tms.sidecar.api_key or the TMS_SIDECAR_API_KEY environment variable",
    "--config": "list the flags themselves in tms.sidecar.extra_args (a vLLM --config file "
                "could set host, port, socket or key)",
    "--grpc-port": "nothing: an extra gRPC listener would bypass the private socket",
    # The server's default sampling parameters must be vLLM's neutral ones (the plugin passes
    # `--generation-config vllm`); each request states its own from tms.generation.*.
    "--generation-config": "tms.generation.* for sampling settings (the plugin starts the "
                           "server with --generation-config vllm, neutral defaults)",
    "--override-generation-config": "tms.generation.* for sampling settings (the server's "
                                    "defaults stay vLLM's neutral ones)",
}
PROTECTED_SERVER_ENV = {
    "VLLM_SERVER_DEV_MODE": "nothing: the plugin enables dev mode itself, only for in-place "
                            "weight reloads on its private socket",
    "VLLM_API_KEY": "tms.sidecar.api_key or the TMS_SIDECAR_API_KEY environment variable",
}


def protected_flag(arg: str) -> str | None:
    """The protected vLLM flag `arg` sets (exactly or abbreviated), or None."""
    if not arg.startswith("--") or arg == "--":
        return None
    name = arg.split("=", 1)[0].replace("_", "-")
    return next((flag for flag in PROTECTED_SERVER_FLAGS if flag.startswith(name)), None)



def _http_url(url: str) -> str:
    """A server's base URL, checked: http(s)://host[:port], no trailing slash."""
    parts = urlsplit(url)
    try:
        port = parts.port  # raises on a non-numeric or out-of-range port
    except ValueError as err:
        raise ValueError(f"malformed sidecar url {url!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"malformed sidecar url {url!r}: expected http(s)://host[:port], "
            "e.g. http://127.0.0.1:8000 or http://[::1]:8000"
        )
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"sidecar url {url!r}: port must be in 1..65535")
    return url.rstrip("/")


class SidecarConfig(_Section):
    """Where the vLLM server comes from when `generation.backend: vllm`.

    Engine settings Axolotl's own `vllm:` block already has (tensor/data parallel size,
    gpu_memory_utilization, dtype, max_model_len, enable_prefix_caching, enforce_eager) are read
    from there. Host and port are not: Axolotl defaults `vllm.host` to 0.0.0.0, and a server
    this plugin launches listens on a private Unix socket unless told otherwise.
    """

    url: str | None = Field(
        default=None,
        description="Base URL of an already running vLLM server (e.g. http://127.0.0.1:8000). "
        "When unset, the plugin launches one as a child process and stops it afterwards.",
    )
    urls: list[str] = Field(
        default_factory=list,
        description="Base URLs of several already running vLLM servers, used together like "
        "the engines the plugin launches: full-weight checkpoints split into equal spans of "
        "answers in checkpoint order (each server switches in place to the few checkpoints of "
        "its span, so each needs VLLM_SERVER_DEV_MODE=1), LoRA adapters item by item (every "
        "server loads all). Server i is driven by process i modulo the "
        "job's process count. Use instead of `url`, not with it.",
    )
    transport: Literal["uds", "tcp"] | None = Field(
        default=None,
        description="How a launched server listens. `uds` (the default without `url`): a Unix "
        "domain socket in a directory only this user can enter, no TCP port at all. `tcp`: "
        "`host`:`port`, loopback unless `allow_remote`. A server at `url` is always `tcp`.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Interface a launched `tcp` server binds to. Loopback by default "
        "(127.0.0.1 or ::1).",
    )
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of a launched `tcp` server (1-65535). Default: a free port chosen at "
        "launch.",
    )
    allow_remote: bool = Field(
        default=False,
        description="Opt-in required to bind a launched `tcp` server to, or connect to, a "
        "non-loopback address.",
    )
    python: str | None = Field(
        default=None,
        description="Python interpreter that has vLLM installed, used to launch the server "
        "(`python -m vllm.entrypoints.openai.api_server`). Default: the trainer's own python.",
    )
    cuda_visible_devices: str | None = Field(
        default=None,
        description="CUDA_VISIBLE_DEVICES for a launched server, e.g. '3' to keep it on its "
        "own GPU.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="Extra command-line arguments appended to the launched server's command. "
        "Flags the plugin owns (--host, --port, --uds, --api-key, --config, --grpc-port, "
        "--generation-config, --override-generation-config) are rejected. They count in the "
        "generation fingerprint (they may change sampling).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for a launched server. VLLM_SERVER_DEV_MODE "
        "and VLLM_API_KEY are rejected. They count in the generation fingerprint.",
    )
    api_key: str | None = Field(
        default=None,
        description="API key sent as a bearer token. Unset: for a launched server one is "
        "generated; for `url`, the `TMS_SIDECAR_API_KEY` environment variable is used if set. "
        "Passed to a launched server through its environment, never on its command line, and "
        "never written into the configs of child runs.",
    )
    startup_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds to wait for a launched server's /health before failing.",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Timeout of one generation request, in seconds.",
    )
    max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries (with exponential backoff) of a failed request before giving up.",
    )
    engines: Literal["per_gpu", "one"] = Field(
        default="per_gpu",
        description="Launched servers during regeneration. `per_gpu`: every process of the "
        "job (on every node) launches its own server on its own GPU, or one per "
        "`vllm.tensor_parallel_size` x `vllm.data_parallel_size` GPUs, and the work is spread "
        "over them: full-weight checkpoints as equal spans of the answers in checkpoint order "
        "(each engine loads the few checkpoints of its span, each once; T=10 on 8 engines: at "
        "most two), LoRA adapters item by item (every engine loads all); a layout that does not "
        "fit the processes per node, or a fixed `port` with several engines per node, is "
        "refused at config load. `one`: rank 0 launches one server, as a single-process run "
        "always does. A server at `url`, or one pinned by `cuda_visible_devices`, is always "
        "one; servers at `urls` are used as they are.",
    )
    concurrency: int = Field(
        default=256,
        ge=1,
        description="Requests kept in flight at once; one is sent as each answer arrives, so "
        "the engine's batch stays full. Set it to at least what the server runs at once: its "
        "`--max-num-seqs` (vLLM's default: 256 on most GPUs, 1024 on H100/H200-class, 128 on "
        "CPU) or what its KV cache holds, whichever is less (an 8B model with 2k-token "
        "sequences on one 80 GB GPU: about 200), hence the default 256. Requests beyond that "
        "wait in the server's queue, and the wait counts against `request_timeout_s`.",
    )

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str | None) -> str | None:
        return url if url is None else _http_url(url)

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        urls = [_http_url(url) for url in urls]
        repeated = sorted({url for url in urls if urls.count(url) > 1})
        if repeated:
            raise ValueError(f"tms.sidecar.urls lists {repeated[0]} more than once; list each "
                             "server once")
        return urls

    @property
    def servers(self) -> list[str]:
        """The user-run servers: `url`, or `urls`; empty when the plugin launches its own."""
        return [self.url] if self.url else list(self.urls)

    @field_validator("host")
    @classmethod
    def _host_is_bare(cls, host: str) -> str:
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # `[::1]` is URL syntax; the bind address is `::1`
        if not host or any(c in host for c in "/ []"):
            raise ValueError(f"tms.sidecar.host {host!r} is not a host name or IP address")
        return host

    @field_validator("extra_args")
    @classmethod
    def _no_protected_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = protected_flag(arg)
            if flag is not None:
                raise ValueError(
                    f"tms.sidecar.extra_args: {arg!r} sets {flag}, which the plugin controls; "
                    f"remove it and use {PROTECTED_SERVER_FLAGS[flag]}"
                )
        return args

    @field_validator("env")
    @classmethod
    def _no_protected_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if key in PROTECTED_SERVER_ENV:
                raise ValueError(
                    f"tms.sidecar.env: {key} is controlled by the plugin; remove it "
                    f"(instead: {PROTECTED_SERVER_ENV[key]})"
                )
        return env

    @model_validator(mode="after")
    def _transport_matches_settings(self) -> SidecarConfig:
        if self.url and self.urls:
            raise ValueError(
                "tms.sidecar.url and tms.sidecar.urls both name running servers; list them "
                "all in tms.sidecar.urls and remove tms.sidecar.url"
            )
        key = "tms.sidecar.url" if self.url else "tms.sidecar.urls"
        if self.servers and self.transport == "uds":
            raise ValueError(
                "tms.sidecar.transport: uds applies to a server the plugin launches, but "
                f"{key} names a running server (always reached over TCP); remove one "
                "of the two"
            )
        if self.transport is None:
            self.transport = "tcp" if self.servers else "uds"
        # Compared with the defaults, not model_fields_set: Axolotl hands the block back as a
        # dump with every default filled in.
        tcp_only = [key for key in ("host", "port", "allow_remote")
                    if getattr(self, key) != type(self).model_fields[key].default]
        if self.transport == "uds" and not self.servers and tcp_only:
            raise ValueError(
                f"tms.sidecar.{tcp_only[0]} only applies to a TCP server, but a launched "
                "server listens on a private Unix socket by default; set "
                "`tms.sidecar.transport: tcp` to launch it on host:port instead"
            )
        return self

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> SidecarConfig:
        if self.allow_remote:
            return self
        hosts = []
        if self.servers:
            key = "tms.sidecar.url" if self.url else "tms.sidecar.urls"
            hosts.extend((key, urlsplit(url).hostname or "") for url in self.servers)
        elif self.transport == "tcp":
            hosts.append(("tms.sidecar.host", self.host))
        for key, host in hosts:
            if not is_loopback_host(host):
                raise ValueError(
                    f"{key} is {host!r}, which is not a loopback address; the sidecar would be "
                    "reachable from other machines. Use 127.0.0.1 or ::1, or set "
                    "`tms.sidecar.allow_remote: true` to opt in."
                )
        return self


class NodesConfig(_Section):
    """Runs on several nodes (machines): the shared `output_dir` check and heartbeats."""

    probe_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="At the start of a multi-node run, how long rank 0 waits to see a probe "
        "file from every node in `output_dir` before stopping with \"output_dir must be on a "
        "filesystem shared by all nodes\" (nodes start at different times; a shared "
        "filesystem may show new files late).",
    )
    heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        description="How often each node's local rank 0 updates its heartbeat file in "
        "`output_dir` while the run goes on.",
    )
    dead_after_s: float = Field(
        default=180.0,
        gt=0,
        description="A node whose heartbeat has not changed for this long is taken as dead: "
        "the other nodes stop waiting for it (in the harvest or at a stage marker) and exit "
        "with an error naming it. Keep it well above `heartbeat_s` plus the shared "
        "filesystem's attribute-cache delay (NFS: up to 60 s).",
    )

    @model_validator(mode="after")
    def _dead_after_covers_beats(self) -> NodesConfig:
        if self.dead_after_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"tms.nodes.dead_after_s ({self.dead_after_s:g}) must be at least 3 x "
                f"tms.nodes.heartbeat_s ({self.heartbeat_s:g}), or a live node can look dead; "
                "raise dead_after_s or lower heartbeat_s")
        return self


class PLDConfig(_Section):
    """Policy-Label Divergence: held-out NLL of the static labels, logged during training."""

    enabled: bool = Field(default=True, description="Log `tms/pld` and `tms/pld_drift`.")
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        description="Compute PLD every this many optimizer steps. Default: Axolotl's eval "
        "cadence (`eval_steps`/`evals_per_epoch`), else 10 times per run.",
    )
    heldout_size: float | None = Field(
        default=None,
        gt=0,
        description="Held-out split used for PLD: a fraction (<1) or a count (>=1) of the "
        "training examples. Default: Axolotl's `val_set_size`, else 0.05.",
    )
    max_examples: int = Field(
        default=256,
        ge=1,
        description="Cap on held-out examples scored per PLD evaluation (bounds its cost).",
    )
    max_overhead: float = Field(
        default=0.03,
        ge=0,
        description="Budget for PLD and retention as a fraction of training wall time: a "
        "scheduled measurement is skipped while the metrics have already used this share "
        "(the step-0 and final measurements always run). 0 = no limit.",
    )


class RetentionConfig(_Section):
    """Retention probe: how well the model keeps the base model's behaviour off-task."""

    enabled: bool = Field(default=True, description="Log `tms/retention_nll`.")
    prompts: str | None = Field(
        default=None,
        description="Off-task prompts: a .txt (one per line) or .jsonl (`prompt` or `messages` "
        "field) file. Default: the ~100 general prompts shipped with the plugin.",
    )
    max_prompts: int = Field(
        default=100, ge=1, description="Cap on retention prompts scored per evaluation."
    )
    max_new_tokens: int = Field(
        default=128, ge=1, description="Length of the base model's cached reference answers."
    )
    mc_path: str | None = Field(
        default=None,
        description="Optional MMLU-style .jsonl (`question`, `choices` list, `answer` index) "
        "for `tms/retention_mc_acc`: the share of questions whose correct letter is the most "
        "likely first token of the reply.",
    )
    mc_max_questions: int = Field(
        default=200, ge=1, description="Cap on `mc_path` questions scored per evaluation."
    )

    @field_validator("mc_path")
    @classmethod
    def _mc_file_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"mc_path {path!r} is not a file")
        return str(Path(path).resolve()) if path else path


class TMSConfig(_Section):
    """Trajectory-Mixed Supervision (arXiv 2602.03073): harvest, regenerate, train student."""

    num_checkpoints: int = Field(
        default=10,
        ge=1,
        description="T: checkpoints harvested from the SFT run, evenly spaced over its steps "
        "(checkpoint t at step round(t*S/T); the last is the final model).",
    )
    alpha: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Probability that a student example keeps its original label; otherwise "
        "its target is the answer of a checkpoint drawn uniformly from 1..T.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Seed of the mixture draws (which target each example gets in each "
        "epoch). Answers are sampled with a seed derived from the (prompt, checkpoint) pair, "
        "so a new seed reuses every stored answer that is drawn again.",
    )
    schedule: Literal["offline", "iterative"] = Field(
        default="offline",
        description="`offline`: TMS, answers from all T checkpoints. `iterative`: the "
        "iterative-SFT baseline, answers from the last checkpoint only.",
    )
    turns: Literal["all", "last"] = Field(
        default="all",
        description="Which trained turns of a row a draw of checkpoint t replaces: `all` = "
        "every assistant turn Axolotl trains (each answered with the conversation up to it as "
        "context, as the method's prompts are); `last` = only the last one, earlier trained "
        "turns keep their original label in every epoch.",
    )
    student_init: Literal["base", "last_checkpoint"] = Field(
        default="base",
        description="Where the student starts: the base model, or the last harvested "
        "checkpoint.",
    )
    harvest_from: str | None = Field(
        default=None,
        description="Directory of an existing SFT run (with checkpoint-<step> folders) to take "
        "the T checkpoints from instead of training a harvest run.",
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Regeneration settings."
    )
    sidecar: SidecarConfig = Field(
        default_factory=SidecarConfig,
        description="vLLM server settings (used when `generation.backend: vllm`).",
    )
    nodes: NodesConfig = Field(
        default_factory=NodesConfig,
        description="Multi-node runs: shared `output_dir` check and heartbeats.",
    )
    pld: PLDConfig = Field(default_factory=PLDConfig, description="PLD logging.")
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig, description="Retention probe."
    )

    @field_validator("harvest_from")
    @classmethod
    def _harvest_dir_has_checkpoints(cls, path: str | None) -> str | None:
        if path is None:
            return path
        from tms_axolotl_plugin.checkpoints import list_checkpoints  # no heavy imports

        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"harvest_from {path!r} is not a directory")
        if not list_checkpoints(root):
            raise ValueError(
                f"harvest_from {path!r} holds no checkpoints: expected checkpoint-<step> "
                "folders with model weights (model.safetensors / adapter_model.safetensors)"
            )
        return str(root.resolve())


class TMSArgs(BaseModel):
    """Merged into Axolotl's config model: adds the nested `tms:` key."""

    tms: TMSConfig | None = Field(
        default=None,
        json_schema_extra={
            "description": "Trajectory-Mixed Supervision. Present = `axolotl train` runs "
            "harvest, regenerate and student stages; absent = plain Axolotl."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _tms_is_sft_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tms") is not None:
            if data.get("rl"):
                raise ValueError(
                    f"`tms:` cannot be combined with `rl: {data['rl']}`: TMS is a supervised "
                    "fine-tuning method. Remove `rl:` (or the `tms:` block)."
                )
            if not isinstance(data["tms"], (dict, TMSConfig)):
                raise ValueError(
                    f"`tms:` must be a mapping of settings, got {type(data['tms']).__name__}"
                )
            from tms_axolotl_plugin.dataset_support import check_config
            from tms_axolotl_plugin.errors import TMSConfigError

            from tms_axolotl_plugin.harvest import STAGE_ENV

            try:
                check_config(data, harvest_child=os.environ.get(STAGE_ENV) == "harvest")
            except TMSConfigError as err:  # pydantic reports ValueError (and AssertionError) only
                raise ValueError(str(err)) from None
        return data


def tms_config_from(cfg: Any) -> TMSConfig | None:
    """The typed `tms` block of a (validated) Axolotl config, or None when absent."""
    block = cfg.get("tms") if hasattr(cfg, "get") else None
    if block is None:
        return None
    return block if isinstance(block, TMSConfig) else TMSConfig.model_validate(dict(block))
