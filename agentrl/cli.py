"""The ``agentrl`` console script: one entry point, thin over the Python API."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: agentrl <command> [args]

commands:
  tiny-model   build a random-init Qwen2 + BPE tokenizer locally
                 agentrl tiny-model --output runs/tiny-model --size tiny
  train        GRPO training from a recipe (same as `accelerate launch -m agentrl.train`)
                 agentrl train --config recipes/quickstart.yaml --train.steps=10
  eval         held-out success on environments' test splits
                 agentrl eval --model hf --model_args pretrained=DIR,adapter=DIR --tasks calculator,lookup --limit 50
  envs         list the environments in the name table with their tools
"""


def tiny_model(argv: list[str]) -> None:
    from agentrl.model import SHAPES, build_tiny_model

    parser = argparse.ArgumentParser(prog="agentrl tiny-model", description="Build a random-init Qwen2 causal LM "
                                     "and a byte-level BPE tokenizer with the Qwen2.5 tool-call chat template.",
                                     epilog="example: agentrl tiny-model --output runs/tiny-model --size tiny")
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--vocab_size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output, size=args.size, vocab_size=args.vocab_size, seed=args.seed)
    print(f"wrote {args.size} model to {path}")


def list_envs(argv: list[str]) -> None:
    from agentrl.envs import make_env
    from environments import ENVIRONMENTS

    for name in ENVIRONMENTS:
        env = make_env(name)
        tools = ", ".join(t["function"]["name"] for t in env.tools())
        print(f"{name:<12} {env.version:<16} splits={env.split_sizes}  tools: {tools}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "tiny-model":
        tiny_model(rest)
    elif command == "train":
        from agentrl.train.cli import main as train_main

        train_main(rest)
    elif command == "eval":
        from agentrl.eval.cli import main as eval_main

        eval_main(rest)
    elif command == "envs":
        list_envs(rest)
    else:
        raise SystemExit(f"agentrl: unknown command {command!r}\n\n{USAGE}")
