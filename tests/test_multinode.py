"""Multi-node runs, simulated with real processes: two torchrun agents on localhost with
`--nnodes 2 --nproc_per_node 1` and a c10d rendezvous are two nodes sharing `output_dir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from conftest import REPO, base_config, read_jsonl, write_config
from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.sidecar import free_port

pytestmark = pytest.mark.slow

FAST_NODES = {"probe_timeout_s": 20, "heartbeat_s": 1, "dead_after_s": 12}


def make_config(workdir: Path, model_dir: Path, data: Path, output_dir: Path | None = None,
                nodes: dict | None = None) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = base_config(
        model_dir, data, output_dir or workdir / "out", sequence_len=256, micro_batch_size=1,
        num_epochs=1, learning_rate=6e-3, plugins=["tms_axolotl_plugin.TMSPlugin"],
        tms={"num_checkpoints": 2, "alpha": 0.25, "seed": 5, "pld": {"enabled": False},
             "retention": {"enabled": False},
             "generation": {"max_new_tokens": 16, "batch_size": 8},
             "nodes": nodes or FAST_NODES})
    cfg.pop("max_steps")
    return write_config(workdir / "cfg.yml", cfg)


def agent(config: Path, log: Path, *, nnodes: int, nproc: int, port: int,
          hosts_store: bool = True) -> subprocess.Popen:
    """One torchrun agent (a "node") running `axolotl train` on `config`. Of several, the one
    with `hosts_store` hosts the launcher's rendezvous store, as node 0 of a cluster does."""
    rendezvous = (["--nnodes", "1", "--standalone"] if nnodes == 1 else
                  ["--nnodes", str(nnodes), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
                   "--rdzv-conf", f"is_host={str(hosts_store).lower()}"])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node",
         str(nproc), "-m", "axolotl.cli.train", str(config)],
        cwd=config.parent, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)


def two_nodes(configs: list[Path], workdir: Path) -> list[subprocess.Popen]:
    # c10d numbers the nodes by (address, agent pid): on one host the agent started first is
    # node 0, and it hosts the store, as node 0 of a cluster would.
    port = free_port()
    return [agent(config, workdir / f"node{n}.log", nnodes=2, nproc=1, port=port,
                  hosts_store=n == 0) for n, config in enumerate(configs)]


def finish(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_tree(process)
            codes.append(None)
    return codes


def kill_tree(process: subprocess.Popen) -> None:
    """What a node's death looks like: its agent and every process under it, at once."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def run_stages(out: Path) -> dict:
    return json.loads((out / "tms" / "stages.json").read_text())


def labels(out: Path) -> dict:
    records = {}
    for directory in (out / "tms" / "labels").iterdir():
        store = LabelStore(directory)
        for batch in store.iter_labels():
            records.update({(r.prompt_key, r.checkpoint): asdict(r) for r in batch})
        store.close()
    return records


def mixture(out: Path) -> list[dict]:
    fingerprint = run_stages(out)["student"]["fingerprint"]
    return read_jsonl(out / "tms" / "student" / f"mixture-{fingerprint}-0.jsonl")


@pytest.fixture(scope="module")
def one_node_and_two_nodes(tmp_path_factory, tiny_model_dir, short_answer_data):
    """The same config run on one node with two processes, and on two nodes with one each."""
    one = tmp_path_factory.mktemp("one_node")
    proc = agent(make_config(one, tiny_model_dir, short_answer_data), one / "node0.log",
                 nnodes=1, nproc=2, port=0)
    assert finish([proc], 1200) == [0], (one / "node0.log").read_text()[-5000:]
    two = tmp_path_factory.mktemp("two_nodes")
    config = make_config(two, tiny_model_dir, short_answer_data)
    codes = finish(two_nodes([config, config], two), 1200)
    assert codes == [0, 0], "\n".join((two / f"node{n}.log").read_text()[-4000:]
                                      for n in range(2))
    return one, two


def test_two_nodes_run_the_pipeline_to_the_end_as_one_node_does(one_node_and_two_nodes):
    one, two = one_node_and_two_nodes
    node0 = (two / "node0.log").read_text()
    assert "tms nodes: 2 nodes share" in node0
    # Each node's leader started its own share of the harvest, at node 0's rendezvous.
    harvest_dir = Path(run_stages(two / "out")["harvest"]["output_dir"])
    node1_harvest = (harvest_dir / "harvest-node1.log").read_text()
    assert "--rdzv-conf is_host=false" in (two / "node1.log").read_text()
    assert "tms: plugin registered (stage: harvest)" in node1_harvest
    assert "--rdzv-conf is_host=true" in node0
    assert len(list((harvest_dir / "tms_checkpoints").glob("checkpoint-*"))) == 2
    # Same answers and the same student rows as the one-node run of the same config.
    assert labels(two / "out") == labels(one / "out")
    assert mixture(two / "out") == mixture(one / "out")
    assert run_stages(two / "out")["student"]["status"] == "done"


def test_a_node_that_dies_mid_harvest_stops_the_other_with_an_error(tmp_path, tiny_model_dir,
                                                                    short_answer_data):
    config = make_config(tmp_path, tiny_model_dir, short_answer_data)
    node0, node1 = two_nodes([config, config], tmp_path)
    deadline = time.monotonic() + 600
    harvest_logs = tmp_path / "out" / "tms"
    while not list(harvest_logs.glob("harvest-*/harvest-node1.log")):  # node 1 is harvesting
        assert time.monotonic() < deadline and node0.poll() is None and node1.poll() is None, \
            (tmp_path / "node0.log").read_text()[-3000:]
        time.sleep(0.5)
    kill_tree(node1)
    killed = time.monotonic()
    code = finish([node0], 240)[0]
    stopped_after = time.monotonic() - killed
    output = (tmp_path / "node0.log").read_text()
    assert code not in (0, None), output[-3000:]
    assert "node 1 stopped: its heartbeat" in output, output[-3000:]
    assert stopped_after < FAST_NODES["dead_after_s"] + 120, stopped_after
    # Node 0's harvest processes were stopped too, not left behind.
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])
                and "harvest_config" in " ".join(p.info["cmdline"] or [])]


def test_an_output_dir_that_nodes_do_not_share_is_refused_at_start(tmp_path, tiny_model_dir,
                                                                   short_answer_data):
    configs = [make_config(tmp_path / f"n{n}", tiny_model_dir, short_answer_data,
                           output_dir=tmp_path / f"n{n}" / "out",
                           nodes={**FAST_NODES, "probe_timeout_s": 5}) for n in range(2)]
    codes = finish(two_nodes(configs, tmp_path), 600)
    outputs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert all(code not in (0, None) for code in codes), outputs[0][-3000:]
    for output in outputs:
        assert "output_dir must be on a filesystem shared by all nodes" in output, output[-3000:]
    for n in range(2):  # refused before any work
        assert not list((tmp_path / f"n{n}" / "out" / "tms").glob("harvest-*"))
        assert not list((tmp_path / f"n{n}" / "out" / "tms").glob("data/examples-*"))
