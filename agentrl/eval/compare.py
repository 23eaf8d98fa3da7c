"""``python -m agentrl.eval.compare A/results.json B/results.json``: per-task success side by side."""

from __future__ import annotations

import argparse
import json


def compare(paths: list[str], labels: list[str]) -> str:
    results = [json.loads(open(p).read()) for p in paths]
    tasks = sorted(set().union(*(r["tasks"] for r in results)))
    head = f"{'task':<14}" + "".join(f"{label:>10}" for label in labels) + f"{'delta':>10}{'n':>6}"
    lines = ["held-out success (test split, greedy)", head]
    for task in tasks + ["mean"]:
        values = [r["mean_success"] if task == "mean" else r["tasks"][task]["success"] for r in results]
        n = "" if task == "mean" else str(results[-1]["tasks"][task]["n"])
        delta = 100 * (values[-1] - values[0])
        lines.append(f"{task:<14}" + "".join(f"{v:>10.3f}" for v in values) + f"{delta:>+9.1f}p{n:>6}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--labels", default=None, help="comma-separated column names")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [f"run{i}" for i in range(len(args.results))]
    print(compare(args.results, labels))


if __name__ == "__main__":
    main()
