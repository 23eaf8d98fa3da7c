"""Asynchronous vs synchronous rollouts on the same recipe and seed: wall-clock and final held-out success.

Both runs start from the same SFT checkpoint (the quickstart's, by default) and train the same number of
steps, so they consume the same number of trajectories; they differ only in ``rollout.max_staleness``.
The clock runs from the start of the first training step to the end of the last (model loading and the
final evaluation excluded); held-out success is the trainer's greedy evaluation at the end.

    python bench/async_vs_sync.py                      # quickstart recipe, its SFT checkpoint, k = 1
    python bench/async_vs_sync.py --staleness 2 --steps 10 -- --policy.backend=vllm --policy.launch=true

Arguments after ``--`` are recipe overrides given to both runs. Needs ``bash launch/quickstart.sh`` first
(for ``runs/quickstart/sft``), or ``--model`` pointing at another warm-started model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_training(recipe: str, model: Path, out: Path, steps: int, staleness: int, extra: list[str]) -> dict:
    """Train once in a subprocess; return wall-clock, trajectory counts and final held-out success."""
    cmd = [sys.executable, "-m", "agentrl.train", "--config", recipe, f"--model.path={model}",
           "--model.build=null", "--sft.enabled=false", f"--train.output_dir={out}", f"--train.steps={steps}",
           "--train.save_every=0", f"--rollout.max_staleness={staleness}", *extra]
    print(f"[bench] k={staleness}: {' '.join(cmd)}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (out / "bench.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] k={staleness} failed (exit {proc.returncode}); log: {out / 'bench.log'}\n"
                         + proc.stdout[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "time/step" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    first, last = step_rows[0], step_rows[-1]
    wall = last["time"] - (first["time"] - first["time/step"])
    success = {k.split("/")[1]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    return {
        "staleness": staleness,
        "steps": len(step_rows),
        "trajectories": int(sum(r["rollout/episodes"] for r in step_rows)),
        "dropped_groups": int(sum(r.get("rollout/stale_dropped", 0) for r in step_rows)),
        "wall_s": wall,
        "load_average": os.getloadavg()[0],
        "process_s": time.time() - started,
        "mean_wait_s": sum(r.get("time/wait", r["time/rollout"]) for r in step_rows) / len(step_rows),
        "mean_update_s": sum(r["time/update"] for r in step_rows) / len(step_rows),
        "staleness_mean": sum(r.get("rollout/staleness_mean", 0) for r in step_rows) / len(step_rows),
        "heldout_success": success,
        "heldout_mean": sum(success.values()) / len(success) if success else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--model", default="runs/quickstart/sft", help="a warm-started model directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--staleness", type=int, default=1, help="max_staleness of the asynchronous run")
    parser.add_argument("--output", default="runs/bench_async")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs, in ABBA order so a load change on a shared machine hits both modes")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise SystemExit(f"[bench] no model at {model}: run `bash launch/quickstart.sh` first (it writes "
                         "runs/quickstart/sft), or pass --model DIR")
    out = Path(args.output)
    order = [k for i in range(args.repeats) for k in ((0, args.staleness) if i % 2 == 0 else (args.staleness, 0))]
    results = [run_training(args.recipe, model, out / f"k{k}_{i}", args.steps, k, extra) for i, k in enumerate(order)]
    by_mode = {k: [r for r in results if r["staleness"] == k] for k in (0, args.staleness)}
    walls = {k: sorted(r["wall_s"] for r in rs) for k, rs in by_mode.items()}
    median = {k: w[len(w) // 2] if len(w) % 2 else (w[len(w) // 2 - 1] + w[len(w) // 2]) / 2 for k, w in walls.items()}
    speedup = median[0] / median[args.staleness]
    heldout = {k: sum(r["heldout_mean"] for r in rs) / len(rs) for k, rs in by_mode.items()}
    print(f"\n{'mode':<14}{'trajs':>7}{'wall s':>9}{'trajs/s':>9}{'wait s':>8}{'update s':>10}{'stale':>7}"
          f"{'dropped':>9}{'load':>6}  held-out success")
    for r in results:
        label = "sync (k=0)" if r["staleness"] == 0 else f"async (k={r['staleness']})"
        per_task = ", ".join(f"{t} {v:.2f}" for t, v in r["heldout_success"].items())
        print(f"{label:<14}{r['trajectories']:>7}{r['wall_s']:>9.1f}{r['trajectories'] / r['wall_s']:>9.2f}"
              f"{r['mean_wait_s']:>8.2f}{r['mean_update_s']:>10.2f}{r['staleness_mean']:>7.2f}"
              f"{r['dropped_groups']:>9}{r['load_average']:>6.1f}  mean {r['heldout_mean']:.3f} ({per_task})")
    print(f"\nasync/sync wall-clock speedup (median of {args.repeats}): {speedup:.2f}x; held-out mean "
          f"{heldout[0]:.3f} (sync) vs {heldout[args.staleness]:.3f} (async); load average at the end "
          f"{os.getloadavg()[0]:.2f}")
    summary = {"runs": results, "speedup": speedup, "extra_overrides": extra, "recipe": args.recipe,
               "model": str(model), "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
