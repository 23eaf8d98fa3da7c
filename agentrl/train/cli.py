"""Command line of the trainer: ``--config RECIPE`` plus ``--section.key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import os
import sys

from agentrl.config import ConfigError, load_recipe

EXAMPLE = """example:
  accelerate launch -m agentrl.train --config recipes/quickstart.yaml --train.steps=40 --rollout.group_size=8
  ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml \\
      -m agentrl.train --config recipes/quickstart.yaml --sft.enabled=false"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="agentrl train", description="GRPO training of LoRA adapters on "
                                     "multi-turn tool-use environments.", epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(args.config, overrides)
    except ConfigError as exc:
        parser.exit(2, f"agentrl train: {exc}\n")
    if args.print_config:
        from agentrl.config import recipe_to_dict

        print(json.dumps(recipe_to_dict(recipe), indent=2))
        return
    from agentrl.eval.runner import format_table
    from agentrl.train.loop import train

    results = train(recipe)
    if results and int(os.environ.get("RANK", "0")) == 0:
        print(format_table(results, title="held-out success after RL"), flush=True)
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Tear down the process group and exit at once: torch+gloo sometimes aborts a rank at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
