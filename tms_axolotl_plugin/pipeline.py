"""The TMS method from one `axolotl train`: prepare data, harvest, draw, regenerate, student.

`run_pipeline` runs inside Axolotl's `load_datasets` hook of the outer run. It finishes (or
skips, by fingerprint) the stages before the student, then rewrites the run's config so that
the outer run itself trains the student through Axolotl's ordinary dataset and training path.

Layout under `<output_dir>/tms/`:
    data/       train and held-out rows, named by the data fingerprint
    harvest-<fingerprint>/  the harvest SFT run (the SFT baseline); weights-only checkpoints
                in tms_checkpoints/checkpoint-<step>
    labels/<generation fingerprint>/   the LabelStore
    student/    the student's mixture files and a record of its stats
    stages.json one line of state per stage: fingerprint and summary
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tms_axolotl_plugin import nodes, ranks
from tms_axolotl_plugin.checkpoints import list_checkpoints, select_evenly_spaced
from tms_axolotl_plugin.config import TMSConfig
from tms_axolotl_plugin.draws import DrawPlan, draw_targets
from tms_axolotl_plugin.errors import TMSConfigError, TMSError
from tms_axolotl_plugin.files import AtomicFile, write_text_atomic
from tms_axolotl_plugin.fingerprint import (
    fingerprint,
    fingerprint_of_items,
    model_dir_digest,
)
from tms_axolotl_plugin.generation import SamplingSettings
from tms_axolotl_plugin.harvest import (
    HARVEST_DIRNAME,
    HARVEST_RUN_ID_FILE,
    HarvestLaunch,
    harvested_checkpoints,
    run_harvest,
)
from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.metrics import METRICS_ENV
from tms_axolotl_plugin.mixture import MixtureStats, write_student_mixture
from tms_axolotl_plugin.pld import ScoredAnswer, save_scored_answers
from tms_axolotl_plugin.regenerate import (
    engine_devices,
    engine_gpus,
    launches_engine_per_gpu,
    regenerate_workers,
    vllm_engine_ranks,
)
from tms_axolotl_plugin.run_summary import StageLog, fallback_warning
from tms_axolotl_plugin.sidecar import free_port
from tms_axolotl_plugin.stage_inputs import stage_fingerprints
from tms_axolotl_plugin.student import FINGERPRINT_ENV, set_aside_foreign_checkpoints
from tms_axolotl_plugin.training_examples import (
    SOURCE_KEYS,
    answer_slots,
    dataset_entry_for,
    load_source,
    tokenizing_strategy,
)
from tms_axolotl_plugin.training_examples.table import (
    ROWS_PER_BATCH,
    ExampleTable,
    build_example_table,
    iter_row_texts,
    table_is_complete,
    table_processes,
    table_versions,
)
from tms_axolotl_plugin.turn_requests import TurnRequests

LOG = get_logger(__name__)

# Never in the harvest's config: it must not publish to the user's Hub repo (Trainer pushes on
# every save_model, so all T checkpoints would be uploaded) nor resume the user's checkpoint.
HARVEST_DROPPED_KEYS = ("hub_model_id", "hub_strategy", "hub_revision", "push_dataset_to_hub",
                        "push_to_hub", "resume_from_checkpoint")


@dataclass(frozen=True)
class StagePaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def harvest(self, harvest_fp: str) -> Path:
        return self.root / f"harvest-{harvest_fp}"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"


def read_stages(paths: StagePaths) -> dict[str, Any]:
    return json.loads(paths.stages.read_text()) if paths.stages.exists() else {}


def record_stage(paths: StagePaths, name: str, **state: Any) -> None:
    """Rank 0 only: remember a stage's fingerprint and summary."""
    stages = read_stages(paths)
    stages[name] = state
    write_text_atomic(paths.stages, json.dumps(stages, indent=2, sort_keys=True))


def _summary(stage: str, message: str) -> None:
    LOG.info("tms %-10s %s", stage + ":", message)


def raw_config(cfg: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as the user gave it: `given` (the YAML with the command line's overrides, as
    the plugin saw it before validation), else the YAML file. Validated configs carry derived
    keys that do not round-trip to YAML."""
    if given is not None:
        return given
    path = cfg.get("axolotl_config_path")
    if not path or not Path(path).exists():
        raise TMSError("cannot find the config file this run was started with")
    return yaml.safe_load(Path(path).read_text()) or {}


def check_trainable(cfg: Any) -> None:
    """Config load checks these already; the validated config is checked again here."""
    from tms_axolotl_plugin.dataset_support import (
        check_datasets,
        check_training_settings,
    )

    check_datasets(cfg.datasets)
    check_training_settings(cfg)


def heldout_count(cfg: Any, tms: TMSConfig, num_examples: int) -> int:
    size = tms.pld.heldout_size or cfg.get("val_set_size") or (0.05 if tms.pld.enabled else 0)
    count = int(size) if size >= 1 else int(math.ceil(size * num_examples))
    if count >= num_examples:
        raise TMSConfigError(f"the held-out split ({count}) leaves no training examples")
    return count


def validated_entries(raw: dict[str, Any], entries: list[dict]) -> list[dict[str, Any]]:
    """`entries` as Axolotl's config validation leaves them (legacy keys converted into
    `message_property_mappings`, defaults filled): what a run with these datasets trains on."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    config = DictDefault(json.loads(json.dumps({**raw, "datasets": entries}, default=str)))
    try:
        validated = validate_config(config)
    except (ValueError, TypeError) as error:  # pydantic's ValidationError is a ValueError
        raise TMSConfigError(f"the student's `datasets:` entries fail Axolotl's config "
                             f"validation: {error}") from None
    return [{k: v for k, v in dict(d).items() if v is not None} for d in validated.datasets]


def split_heldout(num_rows: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out row indices, each in row order."""
    order = np.random.default_rng(seed).permutation(num_rows)
    heldout = np.zeros(num_rows, dtype=bool)
    heldout[order[:count]] = True
    return np.flatnonzero(~heldout), np.flatnonzero(heldout)


def entries_with_rows(table: ExampleTable, rows: np.ndarray, num_datasets: int) -> list[int]:
    """The `datasets:` indices that have at least one of `rows`."""
    return np.flatnonzero(np.bincount(table.dataset_index[rows], minlength=num_datasets)).tolist()


def write_table_rows(table: ExampleTable, rows: np.ndarray, directory: Path, stem: str,
                     dataset_configs: list[Any]) -> list[dict[str, Any]]:
    """The raw rows `rows` of the table, one JSONL per `datasets:` entry (rank 0 writes them
    in one pass, if not there yet); returns the `datasets:` entries that read them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {i: directory / f"{stem}-{i}.jsonl"
             for i in entries_with_rows(table, rows, len(dataset_configs))}
    if ranks.rank() == 0 and not all(p.exists() for p in paths.values()):
        with ExitStack() as stack:
            files = {i: stack.enter_context(AtomicFile(p)) for i, p in paths.items()}
            for start in range(0, len(rows), ROWS_PER_BATCH):
                batch = rows[start: start + ROWS_PER_BATCH]
                texts = table.row_texts(int(batch[0]), int(batch[-1]) + 1)
                for row in batch:
                    files[int(table.dataset_index[row])].write(texts[int(row - batch[0])] + "\n")
    return [dataset_entry_for(dataset_configs[i], paths[i]) for i in paths]


def harvest_config(raw: dict[str, Any], train_entries: list[dict], heldout_entries: list[dict],
                   output_dir: Path) -> dict[str, Any]:
    """The harvest run's config: the user's, on the training split, without Hub publishing,
    without the user's resume path and without the sidecar key (written to disk)."""
    cfg = {key: value for key, value in raw.items() if key not in HARVEST_DROPPED_KEYS}
    cfg.update({"datasets": train_entries, "val_set_size": 0,
                "auto_resume_from_checkpoints": True, "output_dir": str(output_dir)})
    if heldout_entries and (raw.get("val_set_size") or 0) > 0:
        cfg["test_datasets"] = heldout_entries
    # The harvest is its own run in the trackers, not a second writer to the student's.
    for key in ("wandb_name", "wandb_run_id", "mlflow_run_name"):
        if cfg.get(key):
            cfg[key] = f"{cfg[key]}-harvest"
    sidecar = (cfg.get("tms") or {}).get("sidecar")
    if isinstance(sidecar, dict) and "api_key" in sidecar:
        cfg["tms"] = {**cfg["tms"], "sidecar": {k: v for k, v in sidecar.items()
                                                if k != "api_key"}}
    return cfg


class Pipeline:
    def __init__(self, cfg: Any, tms: TMSConfig, given: dict[str, Any] | None = None):
        self.cfg = cfg
        self.tms = tms
        self.paths = StagePaths(Path(cfg.output_dir) / "tms")
        self.dataset_configs = list(cfg.datasets)
        # The config as the user gave it: derived configs and datasets are written back to YAML.
        self.raw = raw_config(cfg, given)
        self.raw_dataset_entries = self.raw.get("datasets") or []
        self.epochs = int(cfg.num_epochs or 1)
        self.log = StageLog(self.paths.root / "run_summary.json")

    def _note(self, stage: str, message: str) -> None:
        """Log a stage's outcome and keep it for the run summary."""
        _summary(stage, message)
        self.log.note(stage, message)

    # -- stage 0: data ---------------------------------------------------------------------
    def prepare_data(self, tokenizer) -> None:
        check_trainable(self.cfg)
        strategies = [tokenizing_strategy(d, tokenizer, self.cfg) for d in self.dataset_configs]
        self.slots = [answer_slots(strategy, d)
                      for strategy, d in zip(strategies, self.dataset_configs, strict=True)]
        sources = [load_source(d, self.cfg) for d in self.dataset_configs]
        num_rows = sum(len(source) for source in sources)
        count = heldout_count(self.cfg, self.tms, num_rows)
        # The split is part of the data: a different held-out set is different training data.
        # Dataset entries count by content (the rows) and tokenization settings, not paths.
        # Hashed as the rows stream by: never one string of the whole dataset.
        self.data_inputs = fingerprint_of_items(
            (text for source in sources for text in iter_row_texts(source)),
            [{k: v for k, v in dict(d).items() if k not in SOURCE_KEYS}
             for d in self.dataset_configs],
            getattr(tokenizer, "chat_template", None), count,
        )
        self.data_fp = self.fingerprints()["data"]
        self.table = self._example_table(sources, strategies)
        self.train_rows, self.heldout_rows = split_heldout(num_rows, count, self.cfg.seed or 0)
        stem = f"{self.data_fp}"
        self.train_entries = write_table_rows(self.table, self.train_rows, self.paths.data,
                                              f"train-{stem}", self.raw_dataset_entries)
        self.heldout_entries = write_table_rows(self.table, self.heldout_rows, self.paths.data,
                                                f"heldout-{stem}", self.raw_dataset_entries)
        # The student trains on files of these entries: validated as Axolotl validates the
        # harvest's config, before the harvest starts (no hours lost on a config it refuses).
        validated = validated_entries(self.raw, self.train_entries + self.heldout_entries)
        self.student_heldout_entries = validated[len(self.train_entries):]
        n = len(self.dataset_configs)
        present = entries_with_rows(self.table, self.train_rows, n)
        self.student_entries: list[Any] = [None] * n  # by `datasets:` index, like the rows
        for index, entry in zip(present, validated[: len(self.train_entries)], strict=True):
            self.student_entries[index] = entry
        t = self.table.turns
        per_row = t.first[self.train_rows + 1] - t.first[self.train_rows]
        is_train = np.zeros(len(self.table), dtype=bool)
        is_train[self.train_rows] = True
        codes = np.bincount(t.kept_code[is_train[t.row]], minlength=len(t.reasons))
        kept = {why: int(n) for why, n in zip(t.reasons, codes, strict=True) if why and n}
        kept_text = "".join(f", {n} kept ({why})" for why, n in sorted(kept.items()))
        self._note("data", f"{len(self.train_rows)} training examples "
                   f"({int(np.count_nonzero(per_row == 0))} without a trained answer) with "
                   f"{int(per_row.sum())} trained turns{kept_text}; {len(self.heldout_rows)} "
                   f"held out; fingerprint {self.data_fp}")

    def _example_table(self, sources: list, strategies: list) -> ExampleTable:
        """Rank 0 tokenizes once per data fingerprint; every rank memory-maps the result."""
        directory = self.paths.data / f"examples-{fingerprint(self.data_fp, table_versions())}"

        def work():
            if table_is_complete(directory):
                _summary("data", f"reusing the tokenized table {directory.name}")
                return
            started = time.perf_counter()
            build_example_table(directory, sources, strategies, self.cfg)
            self.log.extra["tokenized_seconds"] = round(time.perf_counter() - started, 1)
            _summary("data", f"tokenized {sum(len(s) for s in sources)} rows into "
                     f"{directory.name} in {time.perf_counter() - started:.1f}s "
                     f"(dataset_num_proc {table_processes(self.cfg, max(map(len, sources)))})")

        ranks.main_does_then_all_wait(self.paths.markers, "data", work)
        if ranks.rank() != 0:
            _summary("data", f"rank {ranks.rank()} reads the table tokenized by rank 0")
        return ExampleTable.open(directory, self.tms.turns)

    # -- metric inputs (PLD held-out answers, retention reference answers) ------------------
    def prepare_metric_inputs(self, tokenizer) -> None:
        """Write the answers PLD and the retention probe score; name them for both runs."""
        from tms_axolotl_plugin.retention import (
            base_answers_path,
            ensure_base_answers,
            load_retention_prompts,
        )

        self.metric_inputs: dict[str, str] = {}
        if self.tms.pld.enabled and len(self.heldout_rows):
            # Every trained turn's static label ("turns": files of the one-turn-per-row
            # version hold last turns only and are not reused).
            path = (self.paths.data / f"heldout-{self.data_fp}-max{self.tms.pld.max_examples}"
                    "-turns.scored.jsonl")
            if ranks.rank() == 0 and not path.exists():
                save_scored_answers(path, self._heldout_answers(self.tms.pld.max_examples))
            self.metric_inputs["heldout"] = str(path)
        if self.tms.retention.enabled:
            r = self.tms.retention
            prompts = load_retention_prompts(r.prompts, r.max_prompts)
            path = base_answers_path(self.cfg, tokenizer, prompts, r.max_new_tokens,
                                     self.paths.root / "retention")
            if ranks.rank() == 0:
                try:
                    ensure_base_answers(self.cfg, tokenizer, prompts, r.max_new_tokens, path)
                except BaseException as error:
                    ranks.record_failure(self.paths.markers, "retention", error)
                    raise
            self.metric_inputs["retention"] = str(path)
        ranks.wait_for([Path(p) for p in self.metric_inputs.values()], self.paths.markers,
                       "retention")
        os.environ[METRICS_ENV] = json.dumps(self.metric_inputs)

    def _heldout_answers(self, limit: int) -> list[ScoredAnswer]:
        """The static labels of the held-out rows' trained turns, the first `limit` of them."""
        scored: list[ScoredAnswer] = []
        for row in self.heldout_rows:
            if len(scored) >= limit:
                break
            scored += [ScoredAnswer(t.prompt_ids, t.answer_ids)
                       for t in self.table.turn_objects(int(row))]
        return scored[:limit]

    def fingerprints(self, student_inputs: Any = None) -> dict[str, str]:
        """The stage fingerprints as far as they are known (see `stage_inputs`)."""
        return stage_fingerprints(
            self.raw, data_inputs=self.data_inputs, world_size=ranks.world_size(),
            harvest=getattr(self, "harvest_from_fp", None),
            harvest_run_id=getattr(self, "harvest_run_id", ""), student_inputs=student_inputs)

    # -- stage 1: harvest ------------------------------------------------------------------
    def harvest(self) -> dict[int, Path]:
        T = self.tms.num_checkpoints
        if self.tms.harvest_from:
            chosen = select_evenly_spaced(list_checkpoints(Path(self.tms.harvest_from)), T)
            self.harvest_from_fp = fingerprint([model_dir_digest(c.path) for c in chosen])
            self.harvest_fp = self.harvest_from_fp
            self.harvest_run_id = ""  # the fingerprint already digests the weights
            self._note("harvest", f"skipped: taking {T} checkpoints from {self.tms.harvest_from} "
                     f"(steps {[c.step for c in chosen]})")
            return {t: c.path for t, c in enumerate(chosen, start=1)}

        self.harvest_fp = self.fingerprints()["harvest"]
        harvest_dir = self.paths.harvest(self.harvest_fp)
        done = self.paths.markers / f"harvest-{self.harvest_fp}.done"
        run_id = harvest_dir / HARVEST_RUN_ID_FILE

        def work():
            found = harvested_checkpoints(harvest_dir)
            if done.exists() and len(found) >= T and run_id.exists():
                self._note("harvest", f"skipped: finished earlier (fingerprint {self.harvest_fp})")
                return
            if done.exists():  # the folder was deleted or emptied: train it again
                self._note("harvest", f"finished earlier, but {harvest_dir} holds {len(found)} of "
                         f"{T} checkpoints now; training the harvest again")
                done.unlink()
                run_id.unlink(missing_ok=True)
            harvest_dir.mkdir(parents=True, exist_ok=True)
            config_path = harvest_dir / "harvest_config.yml"
            config = harvest_config(self.raw, self.train_entries, self.heldout_entries,
                                    harvest_dir)
            write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False), mode=0o600)
            launch = self._harvest_launch()
            try:
                run_harvest(config_path, launch, harvest_dir / "harvest.log",
                            check=self._harvest_check)
            except BaseException as error:
                if launch.nnodes > 1:  # the other nodes stop theirs; a dead node is the cause
                    ranks.record_failure(self.paths.markers, "harvest", error)
                    self._wait_for_harvest_nodes(launch.nnodes, report_failures=False)
                raise
            self._wait_for_harvest_nodes(launch.nnodes)
            found = harvested_checkpoints(harvest_dir)
            if len(found) < T:
                raise TMSError(f"the harvest run left {len(found)} of {T} checkpoints in "
                               f"{harvest_dir / HARVEST_DIRNAME}")
            write_text_atomic(run_id, uuid.uuid4().hex)
            record_stage(self.paths, "harvest", fingerprint=self.harvest_fp,
                         output_dir=str(harvest_dir), steps=[c.step for c in found])
            done.touch()
            self._note("harvest", f"done: {T} checkpoints at steps {[c.step for c in found]}")

        if ranks.rank() != 0 and nodes.num_nodes() > 1 and nodes.is_node_leader():
            self._harvest_share(harvest_dir)
        ranks.main_does_then_all_wait(self.paths.markers, "harvest", work)
        self.harvest_run_id = run_id.read_text() if run_id.exists() else ""
        found = harvested_checkpoints(harvest_dir)
        return {t: c.path for t, c in enumerate(found[-T:], start=1)}

    def _harvest_check(self) -> None:
        """While this node's harvest processes run: stop them if another node failed or died."""
        ranks.raise_if_failed(self.paths.markers, "harvest")
        ranks.run_wait_checks()

    def _wait_for_harvest_nodes(self, count: int, report_failures: bool = True) -> None:
        """Rank 0: until every other node's harvest processes have exited (they may still be
        writing the last checkpoint); raise if one died, or (`report_failures`) failed."""
        exited = [ranks.launch_file(self.paths.markers, f"harvest-node{n}", "exited")
                  for n in range(1, count)]
        ranks.wait_for(exited, self.paths.markers, "harvest-nodes")
        for node, path in enumerate(exited if report_failures else [], start=1):
            if (outcome := path.read_text().strip()) != "0":
                raise TMSError(f"node {node}'s share of the harvest failed: {outcome}")

    def _harvest_launch(self) -> HarvestLaunch:
        """Rank 0: how the harvest starts; with several nodes, the rendezvous that node 0 hosts
        is published for the other nodes' leaders (`_harvest_share`)."""
        count = nodes.num_nodes()
        if count == 1:
            return HarvestLaunch(ranks.world_size())
        address, port = nodes.reachable_address(), free_port()
        launch = HarvestLaunch(nodes.local_world_size(), count,
                               f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                               f"tms-harvest-{ranks.launch_id()}")
        write_text_atomic(ranks.launch_file(self.paths.markers, "harvest", "rendezvous"),
                          json.dumps(asdict(launch)))
        return launch

    def _harvest_share(self, harvest_dir: Path) -> None:
        """The leader of a node other than rank 0's: when rank 0 starts the harvest (rather
        than finding it done), start this node's processes of it at the same rendezvous."""
        markers = self.paths.markers
        published = ranks.launch_file(markers, "harvest", "rendezvous")
        while not published.exists():
            if ranks.released(markers, "harvest"):
                return  # rank 0 found the harvest finished earlier
            ranks.raise_if_failed(markers, "harvest")
            ranks.run_wait_checks()
            time.sleep(ranks.POLL_SECONDS)
        launch = HarvestLaunch(**{**json.loads(published.read_text()),
                                  "hosts_rendezvous": False})
        node = nodes.node_rank()
        exited = ranks.launch_file(markers, f"harvest-node{node}", "exited")
        try:
            run_harvest(harvest_dir / "harvest_config.yml", launch,
                        harvest_dir / f"harvest-node{node}.log", check=self._harvest_check)
        except BaseException as error:
            write_text_atomic(exited, f"{type(error).__name__}: {error}\n")
            raise
        write_text_atomic(exited, "0\n")

    # -- stage 2: draws and regeneration ---------------------------------------------------
    def draw(self) -> DrawPlan:
        plan = draw_targets(len(self.train_rows), self.epochs, self.tms.num_checkpoints,
                            self.tms.alpha, self.tms.seed, self.tms.schedule,
                            self.tms.generation.all_checkpoints)
        s = plan.savings()
        # What regenerate sends: one request per distinct (turn prompt, checkpoint); identical
        # prompts share an answer, capped so that it fits every row it goes into.
        self.turn_requests = TurnRequests.build(
            self.table, self.train_rows, plan, self.cfg.sequence_len,
            self.tms.generation.max_new_tokens or self.cfg.sequence_len)
        self._note("draws", f"{self.epochs} epoch(s) x {len(self.train_rows)} rows, original "
                   f"label kept for {plan.label_fraction():.1%} of (row, epoch) draws; "
                   f"{s['generations']} (row, checkpoint) pairs needed vs "
                   f"{s['all_checkpoints_generations']} for all T ({s['saved']} saved, "
                   f"{s['per_prompt']:.2f} per row), {len(self.turn_requests)} turn answers to "
                   "generate")
        return plan

    def generation_fp(self) -> str:
        return self.fingerprints()["generation"]

    def regenerate(self, checkpoints: dict[int, Path]) -> LabelStore:
        """Answer the turn requests of the draws (`draw` comes first)."""
        requests = self.turn_requests
        self.log.extra["answers_per_checkpoint"] = requests.per_checkpoint()
        store = LabelStore(self.paths.labels / self.generation_fp())
        work_fp = requests.work_fingerprint()
        owners = self._worker_ranks()
        workers = len(owners)
        markers = [store.directory / f"done-{work_fp}-{w}-of-{workers}" for w in range(workers)]
        if all(m.exists() for m in markers):
            self._note("regenerate", f"skipped: all {len(requests)} answers stored "
                     f"({store.directory.name})")
            return store
        mine = [w for w, owner in enumerate(owners) if owner == ranks.rank()]
        by_checkpoint = (workers > 1 and self.tms.generation.backend == "vllm" and not any(
            (path / "adapter_config.json").exists() for path in checkpoints.values()))

        def done(worker: int, report) -> None:
            markers[worker].touch()
            who = f"rank {ranks.rank()}" + (
                f" (server {worker}, {self.tms.sidecar.urls[worker]})" if len(mine) > 1 else "")
            _summary("regenerate", f"{who}: {report.generated} answers generated "
                     f"({report.generated_tokens} tokens, {report.seconds:.1f}s), "
                     f"{report.already_stored} already stored")

        if mine:
            try:
                regenerate_workers(
                    mine, workers, lambda worker: self._backend(worker if workers > 1 else None),
                    requests, checkpoints, SamplingSettings.from_config(self.tms.generation),
                    store, by_checkpoint, done)
            except BaseException as error:
                ranks.record_failure(self.paths.markers, "regenerate", error)
                raise
        ranks.wait_for(markers, self.paths.markers, "regenerate")
        self.log.note("regenerate", f"done: all {len(requests)} answers stored "
                      f"({store.directory.name}; {workers} generation worker(s), each one's "
                      "count in the log)")
        return store

    def _worker_ranks(self) -> list[int]:
        """The rank that runs each generation worker: every rank with `hf`; with `vllm`, those
        that run an engine, or (user-run `urls`) server i's worker on rank i mod world size."""
        g, s = self.tms.generation, self.tms.sidecar
        if g.backend == "hf":
            return list(range(ranks.world_size()))
        if s.urls:
            return [i % ranks.world_size() for i in range(len(s.urls))]
        if not launches_engine_per_gpu(self.tms, ranks.world_size()):
            return [0]  # one server; its client batches everything
        return vllm_engine_ranks(ranks.world_size(), nodes.local_world_size(),
                                 engine_gpus(self.cfg.vllm))

    def _backend(self, worker: int | None = None):
        """The generator of this worker; None: the only one."""
        g = self.tms.generation
        if g.backend == "hf":
            from tms_axolotl_plugin.generation import HFGenerator

            if self.cfg.bf16 is True:
                dtype = "bfloat16"
            elif self.cfg.bf16 is False and not self.cfg.fp16:
                dtype = "float32"  # what the run trains in, so answers match its precision
            else:
                dtype = "auto"
            return HFGenerator(g.batch_size, dtype=dtype, base_model=self.cfg.base_model)
        from tms_axolotl_plugin.vllm_backend import VLLMGenerator

        s = self.tms.sidecar
        if s.urls:  # the worker's own server, as if it were the only one
            tms = self.tms.model_copy(update={"sidecar": s.model_copy(
                update={"url": s.urls[worker or 0], "urls": []})})
            return VLLMGenerator.from_config(self.cfg, tms)
        if worker is None:
            return VLLMGenerator.from_config(self.cfg, self.tms, self.paths.root / "sidecar")
        # a fixed port with several engines per node was refused at config load
        devices = engine_devices(ranks.rank(), nodes.local_world_size(),
                                 engine_gpus(self.cfg.vllm), os.environ.get("CUDA_VISIBLE_DEVICES"))
        tms = self.tms.model_copy(update={"sidecar": s.model_copy(
            update={"cuda_visible_devices": devices})})
        return VLLMGenerator.from_config(self.cfg, tms,
                                         self.paths.root / "sidecar" / f"rank{ranks.rank()}")

    def check_sidecar_reachable(self) -> None:
        """A user-provided server that is down must fail the run before any training."""
        g, s = self.tms.generation, self.tms.sidecar
        if g.backend != "vllm" or not s.servers:
            return
        from tms_axolotl_plugin.sidecar import wait_for_health
        from tms_axolotl_plugin.vllm_backend import user_server_endpoint

        key = "tms.sidecar.url" if s.url else "tms.sidecar.urls"
        for url in s.servers:
            try:
                wait_for_health(user_server_endpoint(s, url), timeout_s=15)
            except TMSError as error:
                raise TMSError(f"{key}: {error}. Start the server first, or leave {key} unset "
                               "to let the plugin launch one.") from None

    # -- stage 3: student ------------------------------------------------------------------
    def student(self, plan: DrawPlan, store: LabelStore, checkpoints: dict[int, Path]) -> str:
        student_fp = self.fingerprints(student_inputs=plan.targets.tolist())["student"]
        paths = {i: self.paths.student / f"mixture-{student_fp}-{i}.jsonl" for i in
                 entries_with_rows(self.table, self.train_rows, len(self.dataset_configs))}
        stats_path = self.paths.student / f"mixture-{student_fp}.stats.json"
        # One process writes the mixture, the stats last: the others wait for them.
        if ranks.rank() == 0 and not stats_path.exists():
            self.paths.student.mkdir(parents=True, exist_ok=True)
            try:
                stats = write_student_mixture(self.table, self.train_rows, plan, store,
                                              self.slots, self.cfg.sequence_len, paths)
                write_text_atomic(stats_path, json.dumps(stats.as_dict(), indent=2))
            except BaseException as error:
                ranks.record_failure(self.paths.markers, "student", error)
                raise
        ranks.wait_for([stats_path], self.paths.markers, "student")
        stats = MixtureStats.from_dict(json.loads(stats_path.read_text()))
        entries = [dataset_entry_for(self.student_entries[i], paths[i]) for i in paths]
        self.mixture_stats = stats
        kept = ", ".join(f"{n} {why}" for why, n in sorted(stats.turns_kept.items())) or "none"
        self._note("mixture", f"{stats.rows} rows ({stats.original_labels} on original labels "
                   f"only, {sum(stats.by_checkpoint.values())} with regenerated answers); "
                   f"{stats.turns} trained turns: {stats.turns_regenerated} regenerated, "
                   f"{stats.turns_label_drawn} label drawn, kept: {kept}; fallbacks to the "
                   f"original label: {stats.fallback_empty} empty, {stats.fallback_truncated} "
                   "truncated")
        self.log.extra["mixture"] = stats.as_dict()
        warning = fallback_warning(stats.as_dict())
        if warning:
            LOG.warning("tms mixture: %s", warning)
        self._point_run_at_student(entries, checkpoints)
        student_inputs = {
            **self.metric_inputs,
            "student_metrics": str(self.paths.student / f"metrics-{student_fp}.jsonl"),
        }
        if self.tms.student_init == "base" and not self.tms.harvest_from:
            # The harvest run also started from the base model: its step-0 values are reused.
            student_inputs["step0_from"] = str(
                self.paths.harvest(self.harvest_fp) / "tms_metrics.jsonl")
        os.environ[METRICS_ENV] = json.dumps(student_inputs)
        os.environ[FINGERPRINT_ENV] = student_fp  # marks the student's own checkpoints
        return student_fp

    def _point_run_at_student(self, entries: list[dict], checkpoints: dict[int, Path]) -> None:
        from axolotl.utils.dict import DictDefault

        cfg = self.cfg
        cfg.datasets = [DictDefault(e) for e in entries]
        if (cfg.val_set_size or 0) > 0:  # the user asked for Axolotl's own eval loss too
            cfg.test_datasets = [DictDefault(e) for e in self.student_heldout_entries] or None
        cfg.val_set_size = 0
        cfg.num_epochs = 1  # the epoch blocks are laid out in the mixture file
        cfg.auto_resume_from_checkpoints = True
        if self.tms.student_init == "last_checkpoint":
            last = checkpoints[max(checkpoints)]
            if cfg.adapter:
                cfg.lora_model_dir = str(last)
            else:
                cfg.base_model = str(last)
                cfg.base_model_config = str(last)

    def start_student(self, student_fp: str) -> None:
        """Rank 0: only this student's own checkpoints may be resumed; record that it runs."""
        def work():
            what = set_aside_foreign_checkpoints(Path(self.cfg.output_dir), student_fp,
                                                 self.paths.root)
            record_stage(self.paths, "student", fingerprint=student_fp, status="running",
                         schedule=self.tms.schedule)
            self._note("student", what)

        ranks.main_does_then_all_wait(self.paths.markers, "student-start", work)


def run_pipeline(cfg: Any, tms: TMSConfig, given: dict[str, Any] | None = None):
    """Finish the stages before the student; return the student's TrainDatasetMeta. `given`:
    the config as the user gave it (YAML and command-line overrides), see `raw_config`."""
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import load_tokenizer

    pipeline = Pipeline(cfg, tms, given)
    pipeline.paths.markers.mkdir(parents=True, exist_ok=True)
    ranks.agree_on_launch_id()
    if ranks.rank() == 0:
        ranks.forget_other_launches(pipeline.paths.markers)
    nodes.NodeWatch.from_config(pipeline.paths.markers, tms.nodes).start()
    pipeline.check_sidecar_reachable()
    tokenizer = load_tokenizer(cfg)
    log = pipeline.log
    with log.timed("data"):
        pipeline.prepare_data(tokenizer)
    with log.timed("metrics"):
        pipeline.prepare_metric_inputs(tokenizer)
    with log.timed("harvest"):
        checkpoints = pipeline.harvest()
    plan = pipeline.draw()
    with log.timed("regenerate"):
        store = pipeline.regenerate(checkpoints)
    with log.timed("mixture"):
        student_fp = pipeline.student(plan, store, checkpoints)

    stages = read_stages(pipeline.paths)
    previous = stages.get("student", {})
    if previous.get("fingerprint") == student_fp and previous.get("status") == "done":
        pipeline._note("student", f"skipped: finished earlier (fingerprint {student_fp}); "
                       "nothing left to do")
        if ranks.rank() == 0:
            log.save()
            report_run(cfg)
        raise SystemExit(0)
    pipeline._note("student", f"training on the mixture (fingerprint {student_fp}, init "
                   f"{tms.student_init})")
    if ranks.rank() == 0:
        log.save()
    pipeline.start_student(student_fp)
    return load_datasets(cfg=cfg)


def report_run(cfg: Any) -> None:
    """Rank 0, at the end: log the run summary (also written to `tms/summary.md`)."""
    from tms_axolotl_plugin.run_summary import final_summary

    try:
        LOG.info("tms run summary (%s):\n%s", Path(cfg.output_dir) / "tms" / "summary.md",
                 final_summary(Path(cfg.output_dir)))
    except (OSError, ValueError, KeyError) as error:  # a summary never fails a finished run
        LOG.warning("tms: could not write the run summary: %s", error)


def mark_student_done(cfg: Any) -> None:
    paths = StagePaths(Path(cfg.output_dir) / "tms")
    state = read_stages(paths).get("student")
    if state and state.get("status") == "running":
        record_stage(paths, "student", **{**state, "status": "done"})
        report_run(cfg)
