"""``agentrl eval``: held-out success of a model (+ adapter) on environments' test splits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """example:
  agentrl eval --model hf --model_args pretrained=runs/quickstart/sft,adapter=runs/quickstart/adapter \\
      --tasks calculator,lookup --limit 100 --output_path runs/quickstart/eval_rl"""


def parse_model_args(text: str) -> dict[str, str]:
    """``"a=1,b=x"`` → ``{"a": "1", "b": "x"}`` (lm-eval's --model_args form)."""
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"--model_args entry {part!r} must be key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrl eval", description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf", choices=["hf"], help="policy backend")
    parser.add_argument("--model_args", required=True, help="pretrained=DIR[,adapter=DIR]")
    parser.add_argument("--tasks", required=True, help="comma-separated environment names or module:Class paths")
    parser.add_argument("--limit", type=int, default=None, help="test tasks per environment (default: all)")
    parser.add_argument("--output_path", default=None, help="directory for results.json")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_turns", type=int, default=6)
    parser.add_argument("--max_total_tokens", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per generate call")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    model_args = parse_model_args(args.model_args)
    unknown = set(model_args) - {"pretrained", "adapter"}
    if unknown or "pretrained" not in model_args:
        raise SystemExit(f"agentrl eval: --model_args takes pretrained=DIR[,adapter=DIR]; got {args.model_args!r}")
    from agentrl.envs import make_env
    from agentrl.eval.runner import format_table, run_eval_episodes, summarize, test_tasks
    from agentrl.policy.base import SamplingParams
    from agentrl.policy.hf import HFPolicy
    from agentrl.rollout.chat import ChatFormat
    from agentrl.rollout.episode import EpisodeLimits
    from agentrl.train.setup import load_model

    model, tokenizer = load_model(model_args["pretrained"])
    if "adapter" in model_args:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_args["adapter"])
    model.eval()
    names = [n for n in args.tasks.split(",") if n]
    envs = {make_env(name).name: name for name in names}  # env name -> how the user spelled it
    prototypes = {env_name: make_env(spec) for env_name, spec in envs.items()}
    policy = HFPolicy(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch=args.batch_size)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    limits = EpisodeLimits(args.max_turns, args.max_total_tokens)
    trajs = run_eval_episodes(policy, ChatFormat(tokenizer), lambda env_name: make_env(envs[env_name]),
                              test_tasks(prototypes, args.limit), sampling, limits)
    results = summarize([t.summary() for t in trajs])
    results["config"] = {"model": args.model, "model_args": model_args, "tasks": names, "limit": args.limit,
                         "temperature": args.temperature}
    print(format_table(results, title=f"held-out success: {args.model_args}"))
    if args.output_path:
        out = Path(args.output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "samples.jsonl").write_text("".join(json.dumps({**t.summary(), "messages": t.messages}) + "\n"
                                                   for t in trajs))
    return results
