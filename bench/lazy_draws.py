"""Generations needed with lazy draws vs generating all T answers per prompt.

    python bench/lazy_draws.py [--store DIR]   (with the trainer venv and PYTHONPATH=.)

Counts come from the real draw plans (`draw_targets`) for GSM8K-train size; tokens are those
counts times the mean answer length measured in a label store of a real run (`--store`), when
given. Writes bench/results/lazy_draws.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tms_axolotl_plugin.draws import draw_targets
from tms_axolotl_plugin.label_store import LabelStore

RESULTS = Path(__file__).parent / "results" / "lazy_draws.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=7473, help="GSM8K train size")
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--store", type=Path, help="a run's tms/labels/<fp> folder")
    args = parser.parse_args()

    lazy = []
    for seed in range(args.seeds):
        plan = draw_targets(args.prompts, args.epochs, args.T, args.alpha, seed)
        lazy.append(len(plan.needed_pairs()))
    full = args.prompts * args.T
    result = {
        "prompts": args.prompts, "T": args.T, "alpha": args.alpha, "epochs": args.epochs,
        "seeds": args.seeds,
        "lazy_answers_mean": statistics.mean(lazy),
        "lazy_answers_per_prompt": statistics.mean(lazy) / args.prompts,
        "all_T_answers": full,
        "fraction_of_all_T": statistics.mean(lazy) / full,
        "expected_per_prompt": 2 * (1 - args.alpha) - ((1 - args.alpha) ** 2) / args.T
        if args.epochs == 2 else None,
    }
    if args.store:
        labels = LabelStore(args.store).load().values()
        tokens = statistics.mean(label.num_tokens for label in labels)
        result.update({
            "store": str(args.store), "store_answers": len(labels),
            "mean_tokens_per_answer": tokens,
            "lazy_tokens": result["lazy_answers_mean"] * tokens,
            "all_T_tokens": full * tokens,
        })
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'':24}{'lazy draws':>14}{'all T':>14}")
    print(f"{'answers':24}{result['lazy_answers_mean']:>14.0f}{full:>14}")
    print(f"{'answers per prompt':24}{result['lazy_answers_per_prompt']:>14.3f}{args.T:>14}")
    if args.store:
        print(f"{'tokens (estimated)':24}{result['lazy_tokens']:>14.0f}{result['all_T_tokens']:>14.0f}")
    print(f"lazy/all = {result['fraction_of_all_T']:.3f}; written to {RESULTS}")


if __name__ == "__main__":
    main()
