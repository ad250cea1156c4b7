"""The label store at scale: 2M answers appended in batches of 256, then read back every way.

    flock /tmp/tms-bench.lock env PYTHONPATH=. $(scripts/env.sh trainer)/bin/python bench/label_store.py

Each phase runs in its own child process, so its peak RSS is its own and every reader opens the
store cold, as a stage does: `append` (batches of 256, as the regenerate stage writes them),
`count`, `contains` (every pair, 4096 per call, as the regenerate stage asks before
generating), `iter_labels` (every answer streamed), `lookup` (every pair, 4096 per call in a
shuffled order, as the mixture stage asks). Answers: 16-hex-digit prompt keys, checkpoints
1..T, texts of 300-600 characters cut from a pool of mixed words, digits, punctuation, accented
and CJK characters and newlines. `--sqlite-baseline N` also appends N of the same answers to an
SQLite table (rollback journal), the alternative the module docstring compares against.
Writes bench/results/label_store.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore

RESULTS = Path(__file__).parent / "results" / "label_store.json"
WORDS = ["the", "answer", "is", "so", "we", "get", "then", "step", "total", "each", "more", "than", "half", "twice", "minus", "plus", "therefore", "equals", "hence", "first", "second", "third", "last", "apples", "books", "train", "hours", "miles", "café", "naïve", "über", "façade", "数学", "答案", "是", "✓", "→", "≤", "12", "7.5", "3/4", "100%", "(x+1)", "$20", "x²", "=", ":", ";", ",", "."]


class Answers:
    """The benchmark's answers, made on demand from a seed: the i-th of n is the same in every
    process, and making a batch costs little next to storing it."""

    def __init__(self, n: int, checkpoints: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        prompts = -(-n // checkpoints)
        self.prompt_keys = [f"{k:016x}" for k in rng.integers(0, 2**63, prompts).tolist()]
        order = np.concatenate([rng.permutation(prompts) + t * prompts
                                for t in range(checkpoints)])[:n]  # checkpoint by checkpoint
        self.prompt_of, self.checkpoint_of = order % prompts, order // prompts + 1
        words = rng.choice(np.array(WORDS, dtype=object), 400_000)
        breaks = rng.random(len(words)) < 0.03
        self.pool = "".join(w + ("\n" if b else " ") for w, b in zip(words, breaks, strict=True))
        self.starts = rng.integers(0, len(self.pool) - 600, n)
        self.lengths = rng.integers(300, 601, n)
        self.tokens = rng.integers(60, 200, n)

    def pairs(self, indices: np.ndarray) -> list[tuple[str, int]]:
        keys = self.prompt_keys
        return [(keys[p], t) for p, t in zip(self.prompt_of[indices].tolist(),
                                             self.checkpoint_of[indices].tolist(), strict=True)]

    def labels(self, start: int, stop: int) -> list[GeneratedLabel]:
        pool, span = self.pool, slice(start, stop)
        return [GeneratedLabel(key, t, pool[s : s + length], "stop", tokens, 80)
                for (key, t), s, length, tokens in zip(
                    self.pairs(np.arange(start, stop)), self.starts[span].tolist(),
                    self.lengths[span].tolist(), self.tokens[span].tolist(), strict=True)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def phase(name: str, store_dir: Path, n: int, checkpoints: int, batch: int) -> dict:
    answers = Answers(n, checkpoints)
    rss_before = peak_rss_mb()
    if name == "append":
        os.sync()  # what earlier processes left to write back would slow the first fsyncs
        store, spent = LabelStore(store_dir), []
        started = time.perf_counter()
        for start in range(0, n, batch):
            labels = answers.labels(start, min(start + batch, n))
            t = time.perf_counter()
            store.append(0, labels)
            spent.append(time.perf_counter() - t)
        seconds = time.perf_counter() - started
        store.close()  # as a finished regenerate stage would: its last segment gets an index
        ms = 1000 * np.array(spent)
        return {"seconds": seconds, "seconds_in_append": float(ms.sum() / 1000),
                "appends": len(ms), "ms_per_append": float(ms.mean()),
                "ms_per_append_median": float(np.median(ms)),
                "ms_per_append_p99": float(np.percentile(ms, 99)),
                "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}
    store = LabelStore(store_dir)
    started, making = time.perf_counter(), 0.0  # making: the pairs asked for, not the store
    if name == "count":
        result = store.count()
    elif name in ("contains", "lookup"):
        order = np.arange(n) if name == "contains" else np.random.default_rng(1).permutation(n)
        result = 0
        for start in range(0, n, 4096):
            t = time.perf_counter()
            pairs = answers.pairs(order[start : start + 4096])
            making += time.perf_counter() - t
            found = store.contains(pairs).sum() if name == "contains" else len(store.lookup(pairs))
            result += int(found)
    elif name == "iter_labels":
        result = sum(len(labels) for labels in store.iter_labels())
    else:
        raise SystemExit(f"unknown phase {name}")
    seconds = time.perf_counter() - started - making
    if result != n:
        raise SystemExit(f"{name}: {result} answers, expected {n}")
    return {"seconds": seconds, "answers": result, "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before}


def sqlite_baseline(db_dir: Path, n: int, checkpoints: int, batch: int) -> dict:
    """The same appends into SQLite with the rollback journal (what works on network file
    systems), pragmas chosen for speed while staying durable per commit."""
    answers = Answers(n, checkpoints)
    connection = sqlite3.connect(db_dir / "labels-rank0.sqlite", isolation_level=None)
    connection.execute("PRAGMA journal_mode=PERSIST")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA cache_size=-65536")
    connection.execute("CREATE TABLE answers (prompt_key TEXT NOT NULL, checkpoint INTEGER NOT "
                       "NULL, text TEXT NOT NULL, finish_reason TEXT NOT NULL, num_tokens "
                       "INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, "
                       "PRIMARY KEY (prompt_key, checkpoint))")
    in_store, last_tenth, appends = 0.0, 0.0, -(-n // batch)
    tenth = max(appends // 10, 1)
    for number, start in enumerate(range(0, n, batch)):
        rows = [(a.prompt_key, a.checkpoint, a.text, a.finish_reason, a.num_tokens,
                 a.prompt_tokens) for a in answers.labels(start, min(start + batch, n))]
        t = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)", rows)
        connection.execute("COMMIT")
        spent = time.perf_counter() - t
        in_store += spent
        if number >= appends - tenth:
            last_tenth += spent
    connection.close()
    return {"answers": n, "seconds_in_append": in_store, "ms_per_append": 1000 * in_store / appends,
            "ms_per_append_last_tenth": 1000 * last_tenth / tenth,
            "bytes_on_disk": sum(p.stat().st_size for p in db_dir.iterdir()),
            "peak_rss_mb": peak_rss_mb()}


def invoking_command() -> str:
    """The command line this was started with, including wrappers such as flock or env."""
    pid, command = os.getpid(), " ".join(sys.argv)
    while (pid := int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])) > 1:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        if not argv or Path(argv[0].decode()).name not in ("flock", "env", "nice", "timeout"):
            break
        command = " ".join(a.decode() for a in argv)
    return command


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=2_000_000)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dir", type=Path, help="where to build the store (default: a temp dir)")
    parser.add_argument("--sqlite-baseline", type=int, default=0, metavar="N",
                        help="also append N answers to SQLite, for comparison")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()
    shape = (args.answers, args.checkpoints, args.batch)
    if args.phase == "sqlite":
        print(json.dumps(sqlite_baseline(args.dir, *shape)))
        return
    if args.phase:
        print(json.dumps(phase(args.phase, args.dir, *shape)))
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="tms-label-store-bench-", dir="/tmp"))
    store_dir = root / "labels"
    if store_dir.exists():
        shutil.rmtree(store_dir)
    try:
        result = run_phases(args, root, store_dir)
    finally:
        if not args.keep:
            shutil.rmtree(root if not args.dir else store_dir, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    phases = result["phases"]
    print(f"label store, {args.answers:,} answers, batches of {args.batch}")
    print(f"{'phase':<38}{'seconds':>9}{'peak RSS MB':>13}")
    labels = {"append": f"append ({phases['append']['appends']:,} calls)",
              "making": "(making the answers, not the store)",
              "count": "count()", "contains": "contains(), 4096 pairs a call",
              "iter_labels": "iter_labels(), everything",
              "lookup": "lookup(), 4096 pairs a call"}
    append = phases["append"]
    rows = {"append": (append["seconds_in_append"], append["peak_rss_mb"]),
            "making": (append["seconds"] - append["seconds_in_append"], None),
            **{name: (p["seconds"], p["peak_rss_mb"]) for name, p in phases.items()
               if name != "append"}}
    for name, (seconds, rss) in rows.items():
        print(f"{labels[name]:<38}{seconds:>9.1f}" + (f"{rss:>13.0f}" if rss else ""))
    print(f"{'append, then lookup of all':<38}{result['append_then_lookup_all_s']:>9.1f}")
    print(f"{'append, then stream of all':<38}{result['append_then_stream_all_s']:>9.1f}")
    print(f"on disk: {result['bytes_on_disk'] / 1e6:.0f} MB in {result['files']} files "
          f"(indexes {result['index_bytes'] / 1e6:.0f} MB); "
          f"{phases['append']['ms_per_append']:.2f} ms per append (median "
          f"{phases['append']['ms_per_append_median']:.2f}, p99 "
          f"{phases['append']['ms_per_append_p99']:.2f})")
    if "sqlite_baseline" in result:
        s = result["sqlite_baseline"]
        print(f"SQLite baseline, {s['answers']:,} answers: {s['ms_per_append']:.1f} ms per append "
              f"({s['ms_per_append_last_tenth']:.1f} ms over the last tenth)")


def run_phases(args: argparse.Namespace, root: Path, store_dir: Path) -> dict:
    common = ["--answers", str(args.answers), "--checkpoints", str(args.checkpoints),
              "--batch", str(args.batch), "--dir", str(store_dir)]
    phases = {}
    for name in ("append", "count", "contains", "iter_labels", "lookup"):
        load_before = os.getloadavg()[0]  # other processes share these 2 cores and the disk
        phases[name] = run_child("--phase", name, *common)
        phases[name]["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        print(f"{name}: {phases[name]['seconds']:.1f} s", file=sys.stderr)
    files = sorted(store_dir.iterdir())
    result = {
        "command": invoking_command(),
        "machine": f"{os.cpu_count()} CPUs, store on {root}",
        "answers": args.answers, "checkpoints": args.checkpoints, "batch": args.batch,
        "phases": phases,
        # appends timed inside store.append: making the answers is the benchmark's own work
        "append_then_lookup_all_s": phases["append"]["seconds_in_append"]
        + phases["lookup"]["seconds"],
        "append_then_stream_all_s": phases["append"]["seconds_in_append"]
        + phases["iter_labels"]["seconds"],
        "all_phases_s": phases["append"]["seconds_in_append"]
        + sum(p["seconds"] for name, p in phases.items() if name != "append"),
        "max_peak_rss_mb": max(p["peak_rss_mb"] for p in phases.values()),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "files": len(files),
        "index_bytes": sum(p.stat().st_size for p in files if p.suffix == ".index"),
    }
    if args.sqlite_baseline:
        db_dir = root / "sqlite"
        db_dir.mkdir(exist_ok=True)
        result["sqlite_baseline"] = run_child(
            "--phase", "sqlite", "--answers", str(args.sqlite_baseline), "--checkpoints",
            str(args.checkpoints), "--batch", str(args.batch), "--dir", str(db_dir))
        # this store's own append cost at the same size, for the same comparison
        result["sqlite_baseline"]["label_store_ms_per_append"] = phases["append"]["ms_per_append"]
    return result


if __name__ == "__main__":
    main()
