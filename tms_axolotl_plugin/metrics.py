"""`TMSMetricsCallback`: PLD, PLD drift, retention NLL and (optionally) multiple-choice retention
accuracy during the harvest and student runs.

Values go through `trainer.log`, so they reach every reporter the config enables (TensorBoard,
W&B, ...) and the trainer state's log history; rank 0 also appends them to a JSON-lines file
that `tms report` reads. The pipeline writes the held-out and retention answers to files and
names them in the environment, so the harvest child process reads the same inputs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.pld import DriftTracker, ScoredAnswer, load_scored_answers, mean_answer_nll

LOG = get_logger(__name__)
# JSON: {"heldout": path, "retention": path, "student_metrics": path, "step0_from": path}
METRICS_ENV = "TMS_METRICS_INPUTS"


def metrics_inputs() -> dict:
    return json.loads(os.environ.get(METRICS_ENV, "{}"))


def cadence(every: float | None, max_steps: int) -> int:
    """Steps between measurements: a tenth of the run by default; a value below 1 is a
    fraction of the run, as the Trainer reads `eval_steps` (Axolotl's `evals_per_epoch`)."""
    if every is None:
        return max(1, round(max_steps / 10))
    if every < 1:
        return max(1, round(every * max_steps))
    return int(every)


class TMSMetricsCallback(TrainerCallback):
    def __init__(self, trainer, stage: str, metrics_path: Path,
                 heldout: list[ScoredAnswer] | None, retention: list[ScoredAnswer] | None,
                 every: int | None, max_length: int | None = None, batch_size: int = 8,
                 max_overhead: float = 0.0, inputs_key: str = "",
                 step0_from: Path | None = None, multiple_choice=None, tokenizer=None):
        self.trainer = trainer
        self.stage = stage
        self.metrics_path = Path(metrics_path)
        self.heldout = heldout or []
        self.retention = retention or []
        self.multiple_choice = multiple_choice or []  # evaluation.MultipleChoice items
        self.tokenizer = tokenizer
        self.every = every
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_overhead = max_overhead
        # Identifies the scored answers, so a value measured elsewhere is reused only if it
        # scored the same ones.
        self.inputs_key = inputs_key
        self.step0_from = Path(step0_from) if step0_from else None
        self.skipped = 0
        self.last_skipped: int | None = None
        self.cost_estimate = 0.0  # seconds per measurement before this run has measured
        self.drift = DriftTracker()
        self.last_step: int | None = None
        self.seconds = 0.0
        self.measurements = 0
        for row in self._history():  # a resumed run keeps its lowest PLD
            if "tms/pld" in row:
                self.drift.update(row["tms/pld"])

    def _history(self, path: Path | None = None) -> list[dict]:
        path = path or self.metrics_path
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def _reusable_step0(self) -> tuple[dict[str, float], float] | None:
        """The harvest run's step-0 values and what measuring them cost, when this run starts
        from the same weights and scores the same answers (a student initialised from the
        base model)."""
        if self.step0_from is None:
            return None
        wanted = {"tms/pld", "tms/pld_drift"} if self.heldout else set()
        wanted |= {"tms/retention_nll"} if self.retention else set()
        wanted |= {"tms/retention_mc_acc"} if self.multiple_choice else set()
        for row in self._history(self.step0_from):
            if row.get("step") == 0 and row.get("inputs") == self.inputs_key \
                    and wanted <= row.keys():
                return {key: row[key] for key in sorted(wanted)}, float(row.get("seconds", 0.0))
        return None

    def _record(self, state, logs: dict[str, float], seconds: float, **extra) -> None:
        self.trainer.log(dict(logs))
        if self.trainer.is_world_process_zero():
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps({"stage": self.stage, "step": state.global_step,
                                         "seconds": seconds, "inputs": self.inputs_key,
                                         **logs, **extra}) + "\n")

    def _measure(self, state) -> None:
        if state.global_step == self.last_step:
            return
        started = time.perf_counter()
        model = self.trainer.model
        logs: dict[str, float] = {}
        # Each rank scores its share; the sums are all-reduced.
        share = {"rank": self.trainer.args.process_index,
                 "world_size": self.trainer.args.world_size}
        if self.heldout:
            pld = mean_answer_nll(model, self.heldout, self.batch_size, self.max_length, **share)
            logs["tms/pld"] = pld
            logs["tms/pld_drift"] = self.drift.update(pld)
        if self.retention:
            logs["tms/retention_nll"] = mean_answer_nll(model, self.retention, self.batch_size,
                                                        self.max_length, **share)
        if self.multiple_choice:
            from tms_axolotl_plugin.evaluation import multiple_choice_accuracy

            # Every rank scores all questions, so sharded models run the same forward calls.
            logs["tms/retention_mc_acc"] = multiple_choice_accuracy(
                model, self.tokenizer, self.multiple_choice, self.batch_size)
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.measurements += 1
        self.last_step = state.global_step
        if logs:
            self._record(state, logs, elapsed)

    def on_train_begin(self, args, state, control, **kwargs):
        self.every = cadence(self.every, state.max_steps)
        self._train_started = time.perf_counter()
        found = self._reusable_step0() if state.global_step == 0 else None
        if found is None:
            self._measure(state)
            return
        # What the harvest's measurement cost is the budget's estimate until this run measures.
        reused, self.cost_estimate = found
        if "tms/pld" in reused:
            reused["tms/pld_drift"] = self.drift.update(reused["tms/pld"])
        self._record(state, reused, 0.0, reused_from=str(self.step0_from))
        self.last_step = 0
        LOG.info("tms metrics (%s): step-0 values taken from %s (same weights, same answers)",
                 self.stage, self.step0_from)

    def _within_budget(self) -> bool:
        """Room for this measurement and the final one (always taken) within the budget."""
        if not self.max_overhead:
            return True
        training = time.perf_counter() - self._train_started - self.seconds
        per_measurement = (self.seconds / self.measurements if self.measurements
                           else self.cost_estimate)
        return self.seconds + 2 * per_measurement <= self.max_overhead * training

    def _all_ranks_agree(self, decision: bool) -> bool:
        """Measure only if every rank's clock allows it: sharded models (ZeRO-3, FSDP) need
        all ranks in the same forward calls."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return decision
        import torch

        flag = torch.tensor([int(decision)], device=self.trainer.args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            if self._all_ranks_agree(self._within_budget()):
                self._measure(state)
            else:
                self.skipped += 1
                self.last_skipped = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.last_skipped == state.global_step:
            self.skipped -= 1  # the final measurement covers it
        self._measure(state)
        total = time.perf_counter() - self._train_started
        LOG.info("tms metrics (%s): %d measurements, %.1fs of %.1fs training wall time "
                 "(%.1f%%); %d scheduled measurements skipped to stay within "
                 "tms.pld.max_overhead", self.stage, self.measurements, self.seconds, total,
                 100 * self.seconds / max(total, 1e-9), self.skipped)


def metrics_callback(cfg, trainer, tms, stage: str) -> TMSMetricsCallback | None:
    """The callback for this run, or None when PLD and retention are both off."""
    inputs = metrics_inputs()
    heldout = retention = None
    if tms.pld.enabled and inputs.get("heldout"):
        heldout = load_scored_answers(Path(inputs["heldout"]))[: tms.pld.max_examples]
    if tms.retention.enabled and inputs.get("retention"):
        retention = load_scored_answers(Path(inputs["retention"]))[: tms.retention.max_prompts]
    multiple_choice = None
    if tms.retention.enabled and tms.retention.mc_path:
        from tms_axolotl_plugin.evaluation import load_multiple_choice

        multiple_choice = load_multiple_choice(Path(tms.retention.mc_path),
                                               tms.retention.mc_max_questions)
    if not heldout and not retention and not multiple_choice:
        return None
    if stage == "harvest":
        path = Path(cfg.output_dir) / "tms_metrics.jsonl"
    else:
        path = Path(inputs["student_metrics"])
    every = tms.pld.eval_steps or cfg.eval_steps or None
    inputs_key = json.dumps([inputs.get("heldout"), len(heldout or []),
                             inputs.get("retention"), len(retention or []),
                             tms.retention.mc_path, len(multiple_choice or [])])
    step0_from = inputs.get("step0_from") if stage == "student" else None
    return TMSMetricsCallback(trainer, stage, path, heldout, retention, every,
                              max_length=cfg.sequence_len, max_overhead=tms.pld.max_overhead,
                              inputs_key=inputs_key, step0_from=step0_from,
                              multiple_choice=multiple_choice,
                              tokenizer=getattr(trainer, "processing_class", None)
                              or getattr(trainer, "tokenizer", None))
