"""``python -m agentrl.eval.compare A/results.json B/results.json``: per-task success side by side."""

from __future__ import annotations

import argparse
import json


def setting(result: dict) -> str:
    """'test split, greedy' from a results.json's config (files written before `split` existed are test)."""
    config = result.get("config", {})
    temperature = config.get("temperature", 0.0)
    return f"{config.get('split', 'test')} split, " + ("greedy" if temperature == 0 else f"temperature {temperature}")


def title(results: list[dict], labels: list[str]) -> str:
    settings = [setting(r) for r in results]
    what = "held-out success" if all(s.startswith("test ") for s in settings) else "success"
    if len(set(settings)) == 1:
        return f"{what} ({settings[0]})"
    return f"{what} (" + "; ".join(f"{label}: {s}" for label, s in zip(labels, settings)) + ")"


def compare(paths: list[str], labels: list[str]) -> str:
    results = [json.loads(open(p).read()) for p in paths]
    tasks = sorted(set().union(*(r["tasks"] for r in results)))
    head = f"{'task':<14}" + "".join(f"{label:>10}" for label in labels) + f"{'delta':>10}{'n':>6}"
    lines = [title(results, labels), head]
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
