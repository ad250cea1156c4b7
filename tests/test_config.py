"""The `tms:` block through Axolotl's own loading path (`load_cfg`: prepare_plugins, then
validate_config, then normalisation), exactly as `axolotl train` loads a YAML."""

from __future__ import annotations

import shutil

import pytest

from conftest import base_config, write_config
from tms_axolotl_plugin.config import TMSConfig

PLUGIN = "tms_axolotl_plugin.TMSPlugin"


def load(tmp_path, cfg: dict):
    from axolotl.cli.config import load_cfg

    return load_cfg(str(write_config(tmp_path / "cfg.yml", cfg)))


@pytest.fixture
def cfg_for(tmp_path, tiny_model_dir, small_chat_dataset):
    def make(tms=None, **overrides):
        cfg = base_config(tiny_model_dir, small_chat_dataset, tmp_path / "out", **overrides)
        cfg["plugins"] = [PLUGIN]
        if tms is not None:
            cfg["tms"] = tms
        return cfg

    return make


def test_valid_block_round_trips_with_defaults_filled(tmp_path, cfg_for):
    cfg = load(tmp_path, cfg_for(tms={"num_checkpoints": 4, "generation": {"temperature": 0.7}}))
    tms = cfg.tms
    assert tms["num_checkpoints"] == 4
    assert tms["alpha"] == 0.25
    assert tms["schedule"] == "offline"
    assert tms["student_init"] == "base"
    assert tms["generation"]["temperature"] == 0.7
    assert tms["generation"]["top_p"] == 1.0
    assert tms["generation"]["backend"] == "hf"
    assert tms["generation"]["all_checkpoints"] is False
    assert tms["sidecar"]["host"] == "127.0.0.1"
    assert tms["pld"]["max_examples"] == 256


def test_empty_block_gets_all_defaults(tmp_path, cfg_for):
    cfg = load(tmp_path, cfg_for(tms={}))
    assert cfg.tms["num_checkpoints"] == 10 and cfg.tms["alpha"] == 0.25


def test_config_without_tms_is_untouched_by_the_plugin(tmp_path, cfg_for):
    with_plugin = load(tmp_path, cfg_for())
    plain_cfg = cfg_for()
    del plain_cfg["plugins"]
    (tmp_path / "plain").mkdir()
    plain = load(tmp_path / "plain", plain_cfg)
    assert "tms" not in with_plugin
    ignore = {"plugins", "axolotl_config_path"}
    a = {k: v for k, v in with_plugin.items() if k not in ignore}
    b = {k: v for k, v in plain.items() if k not in ignore}
    assert a.keys() == b.keys()
    assert {k: str(v) for k, v in a.items()} == {k: str(v) for k, v in b.items()}


BAD_VALUES = [
    ({"alpha": 1.5}, ["tms.alpha", "1.5", "less than or equal to 1"]),
    ({"alpha": -0.1}, ["tms.alpha", "-0.1", "greater than or equal to 0"]),
    ({"num_checkpoints": 0}, ["tms.num_checkpoints", "0", "greater than or equal to 1"]),
    ({"schedule": "online"}, ["tms.schedule", "online", "'offline' or 'iterative'"]),
    ({"student_init": "random"}, ["tms.student_init", "random", "'base' or 'last_checkpoint'"]),
    ({"generation": {"backend": "sglang"}}, ["tms.generation.backend", "sglang", "'hf' or 'vllm'"]),
    ({"generation": {"temperature": 0}}, ["tms.generation.temperature", "0", "greater than 0"]),
    ({"generation": {"top_p": 0}}, ["tms.generation.top_p", "0", "greater than 0"]),
    ({"generation": {"top_p": 1.2}}, ["tms.generation.top_p", "1.2", "less than or equal to 1"]),
    ({"generation": {"max_new_tokens": 0}}, ["tms.generation.max_new_tokens", "0", "greater than or equal to 1"]),
    ({"seed": -3}, ["tms.seed", "-3", "greater than or equal to 0"]),
    ({"sidecar": {"url": "not a url"}}, ["tms.sidecar.url", "not a url", "http(s)://host[:port]"]),
    ({"sidecar": {"url": "http://127.0.0.1:99999"}}, ["tms.sidecar.url", "99999", "0-65535"]),
    ({"sidecar": {"port": 70000}}, ["tms.sidecar.port", "70000", "less than or equal to 65535"]),
    ({"sidecar": {"port": 0}}, ["tms.sidecar.port", "0", "greater than or equal to 1"]),
    ({"sidecar": {"transport": "tcp", "host": "0.0.0.0"}}, ["tms.sidecar", "0.0.0.0", "allow_remote"]),
    ({"sidecar": {"url": "http://10.1.2.3:8000"}}, ["tms.sidecar", "10.1.2.3", "allow_remote"]),
    # A launched server listens on the private socket unless told to use TCP.
    ({"sidecar": {"host": "::1"}}, ["tms.sidecar.host only applies to a TCP server", "transport: tcp"]),
    ({"sidecar": {"port": 8000}}, ["tms.sidecar.port only applies to a TCP server", "transport: tcp"]),
    ({"sidecar": {"url": "http://127.0.0.1:8000", "transport": "uds"}},
     ["tms.sidecar.transport: uds applies to a server the plugin launches", "tms.sidecar.url"]),
    ({"sidecar": {"transport": "tcp", "host": "[::1"}}, ["tms.sidecar.host", "[::1", "not a host"]),
    ({"sidecar": {"urls": ["http://127.0.0.1:8000", "127.0.0.1:8001"]}},
     ["tms.sidecar.urls", "127.0.0.1:8001", "http(s)://host[:port]"]),
    ({"sidecar": {"urls": ["http://127.0.0.1:8000", "http://127.0.0.1:8000/"]}},
     ["tms.sidecar.urls", "http://127.0.0.1:8000 more than once"]),
    ({"sidecar": {"url": "http://127.0.0.1:8000", "urls": ["http://127.0.0.1:8001"]}},
     ["tms.sidecar.url and tms.sidecar.urls", "remove tms.sidecar.url"]),
    ({"sidecar": {"urls": ["http://127.0.0.1:8000", "http://10.1.2.4:8000"]}},
     ["tms.sidecar.urls", "10.1.2.4", "allow_remote"]),
    ({"sidecar": {"urls": ["http://127.0.0.1:8000"], "transport": "uds"}},
     ["tms.sidecar.transport: uds applies to a server the plugin launches", "tms.sidecar.urls"]),
]
# Server settings the plugin owns cannot be overridden through extra_args / env.
PROTECTED = [
    (["--host", "0.0.0.0"], "--host"), (["--host=0.0.0.0"], "--host"), (["--ho", "0.0.0.0"], "--host"),
    (["--port", "9000"], "--port"), (["--uds", "/tmp/x.sock"], "--uds"),
    (["--api-key", "k"], "--api-key"), (["--api_key=k"], "--api-key"),
    (["--config", "serve.yaml"], "--config"), (["--grpc-port", "50051"], "--grpc-port"),
    # sampling defaults: the plugin launches with `--generation-config vllm` (neutral)
    (["--generation-config", "auto"], "--generation-config"),
    (["--generation_config=auto"], "--generation-config"),
    (["--gen", "auto"], "--generation-config"),
    (["--override-generation-config", '{"top_k": 20}'], "--override-generation-config"),
]
BAD_VALUES += [({"sidecar": {"extra_args": ["--max-num-seqs", "8", *args]}},
                ["tms.sidecar.extra_args", repr(args[0]), f"sets {flag}", "plugin controls"])
               for args, flag in PROTECTED]
BAD_VALUES += [({"sidecar": {"extra_args": [flag, "auto"]}},
                ["tms.sidecar.extra_args", "tms.generation.*"])
               for flag in ("--generation-config", "--override-generation-config")]
BAD_VALUES += [({"sidecar": {"env": {key: "1"}}}, ["tms.sidecar.env", key, "controlled by the plugin"])
               for key in ("VLLM_SERVER_DEV_MODE", "VLLM_API_KEY")]
BAD_VALUES += [
    ({"num_checkpionts": 4}, ["tms", "num_checkpionts", "Did you mean 'num_checkpoints'"]),
    ({"generation": {"temprature": 0.5}}, ["tms.generation", "temprature", "Did you mean 'temperature'"]),
]


@pytest.mark.parametrize("tms,expected", BAD_VALUES, ids=[str(t) for t, _ in BAD_VALUES])
def test_bad_value_is_rejected_with_key_value_and_allowed(tmp_path, cfg_for, tms, expected):
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms=tms))
    message = str(excinfo.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_remote_host_accepted_with_explicit_opt_in(tmp_path, cfg_for):
    cfg = load(tmp_path, cfg_for(tms={"sidecar": {"transport": "tcp", "host": "0.0.0.0",
                                                  "allow_remote": True}}))
    assert cfg.tms["sidecar"]["host"] == "0.0.0.0"


def test_launched_server_defaults_to_the_private_socket_and_a_url_to_tcp(tmp_path, cfg_for):
    assert load(tmp_path, cfg_for(tms={})).tms["sidecar"]["transport"] == "uds"
    url = load(tmp_path, cfg_for(tms={"sidecar": {"url": "http://[::1]:8000"}}))
    assert url.tms["sidecar"]["transport"] == "tcp"
    urls = load(tmp_path, cfg_for(tms={"sidecar": {"urls": ["http://[::1]:8000/",
                                                            "http://127.0.0.1:8001"]}}))
    assert urls.tms["sidecar"]["transport"] == "tcp"
    assert urls.tms["sidecar"]["urls"] == ["http://[::1]:8000", "http://127.0.0.1:8001"]
    assert TMSConfig.model_validate(urls.tms).sidecar.servers == urls.tms["sidecar"]["urls"]
    ipv6 = load(tmp_path, cfg_for(tms={"sidecar": {"transport": "tcp", "host": "[::1]"}}))
    assert ipv6.tms["sidecar"]["host"] == "::1"
    harmless = ["--max-num-seqs", "8", "--kv-cache-dtype=fp8", "--hf-overrides", "{}"]
    assert load(tmp_path, cfg_for(tms={"sidecar": {"extra_args": harmless}})).tms[
        "sidecar"]["extra_args"] == harmless


def test_tms_with_rl_is_rejected(tmp_path, cfg_for):
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms={}, rl="grpo"))
    assert "`tms:` cannot be combined with `rl: grpo`" in str(excinfo.value)


def test_harvest_from_without_checkpoints_is_rejected(tmp_path, cfg_for):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "checkpoint-3").mkdir()  # a folder without weights does not count
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms={"harvest_from": str(empty)}))
    assert "harvest_from" in str(excinfo.value) and "holds no checkpoints" in str(excinfo.value)


def test_harvest_from_missing_directory_is_rejected(tmp_path, cfg_for):
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms={"harvest_from": str(tmp_path / "nope")}))
    assert "is not a directory" in str(excinfo.value)


def test_harvest_from_with_real_checkpoints_is_accepted(tmp_path, cfg_for, tiny_model_dir):
    run = tmp_path / "sft_run"
    for step in (2, 4):
        shutil.copytree(tiny_model_dir, run / f"checkpoint-{step}")
    cfg = load(tmp_path, cfg_for(tms={"harvest_from": str(run), "num_checkpoints": 2}))
    assert cfg.tms["harvest_from"] == str(run.resolve())


def test_plugin_keys_survive_only_when_plugins_are_prepared_first(tmp_path, cfg_for):
    """The trap in the notes: validating before prepare_plugins drops plugin keys silently."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(cfg_for(tms={"alpha": 0.5}))
    dropped = validate_config(DictDefault(dict(cfg)))
    assert dropped.get("tms") is None
    from axolotl.utils.config import prepare_plugins

    prepare_plugins(cfg)
    kept = validate_config(cfg)
    assert kept.tms["alpha"] == 0.5


def test_missing_multiple_choice_file_is_rejected(tmp_path, cfg_for):
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms={"retention": {"mc_path": str(tmp_path / "mmlu.jsonl")}}))
    assert "mc_path" in str(excinfo.value) and "is not a file" in str(excinfo.value)


@pytest.mark.parametrize("gather", [False, None, "auto"])
def test_zero3_without_gathered_16bit_weights_is_rejected_naming_the_key(tmp_path, cfg_for,
                                                                       gather):
    import json

    zero = {"stage": 3}
    if gather is not None:
        zero["stage3_gather_16bit_weights_on_model_save"] = gather
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": zero, "train_batch_size": "auto"}))
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms={}, deepspeed=str(path)))
    assert "zero_optimization.stage3_gather_16bit_weights_on_model_save: true" in str(
        excinfo.value)


def test_zero3_with_gathered_16bit_weights_and_zero2_pass_the_harvest_check():
    import json

    from tms_axolotl_plugin.sharding import check_harvest_sharding

    check_harvest_sharding({"deepspeed": {"zero_optimization": {
        "stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}})
    check_harvest_sharding({"deepspeed": json.dumps({"zero_optimization": {"stage": 2}})})
    check_harvest_sharding({"deepspeed": "example_configs/deepspeed/zero2.json"})
    check_harvest_sharding({})


@pytest.mark.parametrize("vllm, sidecar, expected", [
    ({"tensor_parallel_size": 3}, {},
     "8 processes per node cannot be split into vLLM engines of 3 GPUs (vllm.tensor_parallel_size"),
    ({}, {"port": 8123}, "tms.sidecar.port: 8123 is fixed, but each node runs 8 vLLM engines"),
])
def test_engines_that_cannot_be_laid_out_on_the_nodes_are_refused_at_config_load(
        tmp_path, cfg_for, monkeypatch, vllm, sidecar, expected):
    """Every rank of a torchrun launch loads the config with LOCAL_WORLD_SIZE set: a layout
    that fails at regeneration (after the whole harvest) fails here instead."""
    for key, value in {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "0",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    tms = {"generation": {"backend": "vllm"}, "sidecar": {"transport": "tcp", **sidecar}}
    with pytest.raises(Exception) as excinfo:
        load(tmp_path, cfg_for(tms=tms, vllm=vllm))
    assert expected in str(excinfo.value)


def test_engine_layouts_that_fit_pass_the_config_check():
    from tms_axolotl_plugin.regenerate import check_engine_layout

    def check(world, local, vllm=None, **sidecar):
        tms = TMSConfig.model_validate({"generation": {"backend": "vllm"},
                                        "sidecar": {"transport": "tcp", **sidecar}})
        check_engine_layout(tms, vllm, world, local)

    check(16, 8, {"tensor_parallel_size": 2, "data_parallel_size": 2})
    check(8, 8, {"tensor_parallel_size": 8}, port=8123)  # one engine per node
    check(1, 1, {"tensor_parallel_size": 2}, port=8123)  # one process: one server on its GPUs
    check(8, 8, {"tensor_parallel_size": 3}, engines="one", port=8123)
    check(8, 8, {"tensor_parallel_size": 3}, cuda_visible_devices="7")
    check(8, 8, {"tensor_parallel_size": 3}, url="http://127.0.0.1:8000")
    with pytest.raises(Exception, match="1 processes per node cannot be split"):
        check(2, 1, {"tensor_parallel_size": 2})  # two nodes of one process each
