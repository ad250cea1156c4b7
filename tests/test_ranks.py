"""Failure propagation between ranks cannot go stale: real processes, launched again with the
same identity a launcher would repeat (the same parent pid, a fixed torchrun rendezvous id)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from tms_axolotl_plugin.sidecar import free_port

# What the pipeline does for the retention answers: rank 0 writes a file, every rank waits
# for it and re-raises rank 0's failure.
STAGE = """
import sys
from pathlib import Path
import torch.distributed as dist
from tms_axolotl_plugin import ranks

markers, fail = Path(sys.argv[1]), sys.argv[2] == "fail"
if ranks.world_size() > 1 and sys.argv[3] == "process-group":
    dist.init_process_group("gloo")
ranks.agree_on_launch_id()  # else through the torchrun agent's store
answers = markers / "answers.txt"
if ranks.rank() == 0:
    try:
        if fail:
            raise RuntimeError("disk full")
        answers.write_text("done")
    except BaseException as error:
        ranks.record_failure(markers, "retention", error)
        raise
ranks.wait_for([answers], markers, "retention", poll_seconds=0.2)
print(f"rank {ranks.rank()} ok in launch {ranks.launch_id()}", flush=True)
if dist.is_initialized():
    # gloo's threads left running at interpreter exit abort the process now and then
    dist.destroy_process_group()
"""


def clean_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def run(markers: Path, outcome: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STAGE, str(markers), outcome, "none"],
                          env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_failure_of_an_earlier_launch_from_the_same_parent_does_not_fail_the_rerun(tmp_path):
    """One process, no launcher variables: the old identity was the parent pid, which repeats
    (pid 1 of every container start, the same shell)."""
    first = run(tmp_path, "fail")
    assert first.returncode != 0 and "disk full" in first.stderr
    assert list(tmp_path.glob("retention.*.failed"))
    second = run(tmp_path, "ok")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "rank 0 ok" in second.stdout


def torchrun(tmp_path: Path, outcome: str, script: Path,
             sharing: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "slurm-job-42",
               str(script), str(tmp_path), outcome, sharing]
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("sharing", ["process-group", "agent-store"])
def test_requeued_torchrun_job_with_a_fixed_rendezvous_id_succeeds_after_a_failure(tmp_path,
                                                                                  sharing):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    markers = tmp_path / "markers"
    markers.mkdir()
    first = torchrun(markers, "fail", script, sharing)
    output = first.stdout + first.stderr
    assert first.returncode != 0
    assert "another rank failed in stage 'retention': RuntimeError: disk full" in output
    stale = list(markers.glob("retention.*.failed"))
    assert len(stale) == 1

    second = torchrun(markers, "ok", script, sharing)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    launches = {line.rsplit(" ", 1)[-1] for line in second.stdout.splitlines() if " ok in " in line}
    assert len(launches) == 1, second.stdout  # one identity on both ranks
    assert stale[0].exists() and stale[0].name.split(".")[1] not in launches
