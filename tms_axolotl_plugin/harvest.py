"""The harvest stage: a plain SFT run of the base model that keeps T evenly spaced checkpoints.

It runs as its own `axolotl train` process on a derived config, so it is an ordinary Axolotl
run in every respect (packing, attention, DeepSpeed/FSDP, loggers) and its output folder is the
SFT baseline. Inside that run, `HarvestCheckpointCallback` saves the weights (no optimizer
state) at steps round(t*S/T), t = 1..T-1, and at the end of training.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from tms_axolotl_plugin.checkpoints import has_weights, harvest_steps, list_checkpoints
from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.ranks import clean_launch_env, rank
from tms_axolotl_plugin.sharding import save_whole_model
from tms_axolotl_plugin.sidecar import free_port

LOG = get_logger(__name__)

STAGE_ENV = "TMS_STAGE"  # set to "harvest" in the harvest subprocess
HARVEST_DIRNAME = "tms_checkpoints"
# A new id each time a harvest finishes training. Answers and the student are keyed on it, so
# a harvest trained again (its folder deleted) never reuses answers of the old weights.
HARVEST_RUN_ID_FILE = "tms_run_id"


class HarvestCheckpointCallback(TrainerCallback):
    """Saves weights-only checkpoints at the T harvest steps of the run.

    The trainer's step count is planned from an estimate of the dataloader length (packing,
    dropped over-long rows), so a run can end a step or two early; the last checkpoint is
    therefore taken when training ends, at whatever step that is.
    """

    def __init__(self, trainer, num_checkpoints: int, directory: Path):
        self.trainer = trainer
        self.num_checkpoints = num_checkpoints
        self.directory = Path(directory)
        self.steps: list[int] = []
        self.saved: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = harvest_steps(state.max_steps, self.num_checkpoints)
        LOG.info("tms harvest: weights-only checkpoints at steps %s (the last one when "
                 "training ends)", self.steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps[:-1]:
            self._save(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step != self.steps[-1]:
            LOG.warning("tms harvest: planned %d steps but training ended at step %d; the "
                        "last checkpoint is taken there", self.steps[-1], state.global_step)
        if state.global_step not in self.saved:
            self._save(state.global_step)

    def _save(self, step: int) -> None:
        target = self.directory / f"checkpoint-{step}"
        save_whole_model(self.trainer, target)  # a collective under FSDP/ZeRO-3: every rank
        self.saved.add(step)
        # Global rank 0 writes the checkpoint, so it checks; by the launcher's RANK, since the
        # trainer's `is_world_process_zero` was seen True on rank 1 of a 2-process CPU harvest.
        if rank() == 0:
            if not has_weights(target):  # at the first checkpoint, not after the whole run
                raise TMSError(f"tms harvest: {target} holds no model weights after saving "
                               "(none of model.safetensors, adapter_model.safetensors); this "
                               "training layout cannot give the checkpoints TMS needs")
            LOG.info("tms harvest: saved %s", target)


def harvested_checkpoints(harvest_dir: Path):
    return list_checkpoints(Path(harvest_dir) / HARVEST_DIRNAME)


@dataclass(frozen=True)
class HarvestLaunch:
    """How this node starts its share of the harvest run: `nproc_per_node` processes, and with
    several nodes, one torchrun agent per node meeting at a c10d rendezvous that node 0 hosts."""

    nproc_per_node: int
    nnodes: int = 1
    endpoint: str | None = None  # host:port of the rendezvous (several nodes)
    rdzv_id: str | None = None
    hosts_rendezvous: bool = True


def harvest_command(config_path: Path, launch: HarvestLaunch) -> list[str]:
    """The entry point `axolotl train` runs, on as many processes as the outer run has.

    Several processes are started with torchrun (what `accelerate launch --multi_gpu` runs),
    which also works on CPU; Axolotl sets the DeepSpeed/FSDP environment itself from the config.
    """
    train = ["-m", "axolotl.cli.train", str(config_path)]
    if launch.nnodes == 1 and launch.nproc_per_node <= 1:
        return [sys.executable, *train]
    command = [sys.executable, "-m", "torch.distributed.run",
               "--nproc_per_node", str(launch.nproc_per_node)]
    if launch.nnodes == 1:
        return [*command, "--master_port", str(free_port()), *train]
    return [*command, "--nnodes", str(launch.nnodes), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", launch.endpoint, "--rdzv-id", launch.rdzv_id,
            # Node 0 hosts the store whatever its name resolves to; the others connect.
            "--rdzv-conf", f"is_host={str(launch.hosts_rendezvous).lower()}", *train]


def run_harvest(config_path: Path, launch: HarvestLaunch, log_path: Path,
                check: Callable[[], None] | None = None) -> None:
    """Run the harvest training in a child process; its output goes to the console and a log.
    `check` is called every few seconds while it runs: an error it raises (another node died)
    stops the child and is raised here."""
    command = harvest_command(config_path, launch)
    LOG.info("tms harvest: %s (log: %s)", " ".join(command), log_path)
    env = clean_launch_env({STAGE_ENV: "harvest"})
    for key in ("WANDB_RUN_ID", "WANDB_RESUME"):  # would attach the harvest to the outer run
        env.pop(key, None)
    stopped: list[BaseException] = []
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        watcher = None
        if check is not None:
            watcher = threading.Thread(target=_stop_on_error, args=(process, check, stopped),
                                       name="tms-harvest-watch", daemon=True)
            watcher.start()
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = process.wait()
        except BaseException:
            process.terminate()
            process.wait(timeout=60)
            raise
    if stopped:
        raise stopped[0]
    if code != 0:
        raise TMSError(
            f"the harvest SFT run failed (exit code {code}); see {log_path}. Fix the cause and "
            "run the same command again: finished stages are kept."
        )


def _stop_on_error(process: subprocess.Popen, check: Callable[[], None],
                   stopped: list[BaseException], poll_s: float = 2.0) -> None:
    while process.poll() is None:
        try:
            check()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            stopped.append(error)
            LOG.error("tms harvest: %s", error)
            process.terminate()  # torchrun passes SIGTERM on to its workers
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            return
        time.sleep(poll_s)
