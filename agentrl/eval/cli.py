"""``agentrl eval``: held-out success of a model (+ adapter) on environments' test splits (or train splits)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """examples:
  agentrl eval --model hf --model_args pretrained=runs/quickstart/sft,adapter=runs/quickstart/adapter \\
      --tasks calculator,lookup --limit 100 --output_path runs/quickstart/eval_rl
  # the environments exactly as a training recipe configures them (constructor kwargs included):
  agentrl eval --model hf --model_args pretrained=runs/quickstart/sft --config recipes/quickstart.yaml --limit 100
  # sampled by vLLM: a server started for the eval (its log: OUTPUT/vllm_server.log), stopped at the end
  agentrl eval --model vllm --model_args pretrained=runs/quickstart/sft,adapter=runs/quickstart/adapter \\
      --config recipes/quickstart.yaml --limit 100 --output_path runs/quickstart/eval_rl_vllm
  # or a running server that serves the model as `base` (agentrl serve-vllm, launch/vllm_server.sh)
  agentrl eval --model vllm --model_args pretrained=runs/quickstart/sft,url=http://127.0.0.1:8000 \\
      --config recipes/quickstart.yaml --limit 100
  # the first 50 train-split tasks, which SFT's oracle traces start with: low success here as well as on the
  # test split means the model never fit its training tasks; high here and low there, that it does not generalize
  agentrl eval --model hf --model_args pretrained=runs/quickstart/sft --config recipes/quickstart.yaml \\
      --split train --limit 50"""

MODEL_ARGS = {"hf": "pretrained=DIR[,adapter=DIR]", "vllm": "pretrained=DIR[,adapter=DIR][,url=http://HOST:PORT]"}


def parse_model_args(text: str) -> dict[str, str]:
    """``"a=1,b=x"`` → ``{"a": "1", "b": "x"}`` (lm-eval's --model_args form)."""
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"--model_args entry {part!r} must be key=value")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def task_specs(tasks: str | None, recipe=None) -> list[tuple[str, dict]]:
    """``[(env name or path, kwargs)]`` from ``--tasks`` and/or a recipe's ``envs`` section."""
    names = [n for n in (tasks or "").split(",") if n]
    if recipe is None:
        if not names:
            raise SystemExit("agentrl eval: give --tasks, or --config RECIPE to take the recipe's environments")
        return [(name, {}) for name in names]
    specs = [(env.name, dict(env.kwargs)) for env in recipe.envs]
    if names:
        missing = set(names) - {name for name, _ in specs}
        if missing:
            raise SystemExit(f"agentrl eval: {sorted(missing)} not among the recipe's environments")
        specs = [spec for spec in specs if spec[0] in names]
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrl eval", description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hf", choices=sorted(MODEL_ARGS),
                        help="policy backend: hf (transformers, in process) or vllm (a vLLM server over HTTP)")
    parser.add_argument("--model_args", required=True,
                        help=f"hf: {MODEL_ARGS['hf']}; vllm: {MODEL_ARGS['vllm']} (url: a running server that "
                             "serves the model as `base`; without it one is started for the eval)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated environment names or module:Class paths (default: the recipe's)")
    parser.add_argument("--config", default=None,
                        help="a training recipe: its environments, with their kwargs, are the tasks")
    parser.add_argument("--limit", type=int, default=None,
                        help="tasks per environment (default: the recipe's eval.limit, else all)")
    parser.add_argument("--split", default="test", choices=["test", "train"],
                        help="which split's first tasks (default: test; train: the tasks SFT's oracle traces "
                             "start with, to tell underfitting from failing to generalize)")
    parser.add_argument("--output_path", default=None, help="directory for results.json")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the recipe's eval.temperature, else 0)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="per turn (default: recipe's or 64)")
    parser.add_argument("--max_turns", type=int, default=None, help="(default: recipe's or 6)")
    parser.add_argument("--max_total_tokens", type=int, default=None, help="(default: recipe's or 1024)")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="hf: sequences per generate call; vllm: requests in flight at once")
    parser.add_argument("--vllm_python", default=None,
                        help="vllm: the interpreter of the vLLM environment a started server runs in (default: "
                             "$AGENTRL_VLLM_PYTHON, else .venv-vllm/bin/python; bash launch/setup_vllm.sh makes it)")
    parser.add_argument("--request_timeout", type=float, default=300.0,
                        help="vllm: seconds per completion before the eval fails")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    model_args = parse_model_args(args.model_args)
    allowed = {"pretrained", "adapter"} | ({"url"} if args.model == "vllm" else set())
    if set(model_args) - allowed or "pretrained" not in model_args:
        raise SystemExit(f"agentrl eval: --model {args.model} --model_args takes {MODEL_ARGS[args.model]}; "
                         f"got {args.model_args!r}")
    if args.model == "vllm":
        from agentrl.eval.vllm import check_vllm_model_args

        check_vllm_model_args(model_args)
    from agentrl.config import EvalConfig, RolloutConfig, load_recipe

    recipe = load_recipe(args.config) if args.config else None
    specs = task_specs(args.tasks, recipe)
    from agentrl.envs import env_factory
    from agentrl.eval.runner import eval_tasks, format_table, run_eval_episodes, summarize
    from agentrl.policy.base import SamplingParams
    from agentrl.rollout.chat import ChatFormat
    from agentrl.rollout.episode import EpisodeLimits

    prototypes, factories = {}, {}
    urls = {env.name: env.url for env in recipe.envs} if recipe else {}
    for name, kwargs in specs:
        env, factory = env_factory(name, kwargs, urls.get(name, ""))
        prototypes[env.name], factories[env.name] = env, factory
    rollout = recipe.rollout if recipe else RolloutConfig()  # for the limits not given on the command line
    evaluation = recipe.eval if recipe else EvalConfig()
    limit = evaluation.limit if args.limit is None and recipe else args.limit
    temperature = evaluation.temperature if args.temperature is None else args.temperature
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens or rollout.max_new_tokens,
                              temperature=temperature)
    limits = EpisodeLimits(args.max_turns or rollout.max_turns, args.max_total_tokens or rollout.max_total_tokens)
    tasks = eval_tasks(prototypes, limit, args.split)

    def make_env(env_name: str):
        return factories[env_name]()

    served = {}
    if args.model == "vllm":
        from agentrl.eval.vllm import eval_with_vllm

        trajs, served = eval_with_vllm(args, model_args, make_env, tasks, sampling, limits)
    else:
        from agentrl.policy.hf import HFPolicy
        from agentrl.train.setup import load_model

        model, tokenizer = load_model(model_args["pretrained"])
        if "adapter" in model_args:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_args["adapter"])
        model.eval()
        policy = HFPolicy(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch=args.batch_size)
        trajs = run_eval_episodes(policy, ChatFormat(tokenizer), make_env, tasks, sampling, limits)
    results = summarize([t.summary() for t in trajs])
    results["config"] = {"model": args.model, "model_args": model_args, "tasks": [list(s) for s in specs],
                         "limit": limit, "split": args.split, "temperature": temperature, "recipe": args.config,
                         **served}
    what = "held-out success" if args.split == "test" else "train-split success"
    print(format_table(results, title=f"{what}: {args.model_args}"))
    if args.output_path:
        out = Path(args.output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "samples.jsonl").write_text("".join(json.dumps({**t.summary(), "messages": t.messages}) + "\n"
                                                   for t in trajs))
    return results
