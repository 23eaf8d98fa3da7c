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
  eval         held-out success on environments' test splits (--split train: their training tasks)
                 agentrl eval --model hf --model_args pretrained=DIR,adapter=DIR --tasks calculator,lookup --limit 50
  envs         list the environments in the name table with their tools
  serve-env    serve environments' sessions over HTTP (docs/env-service.md)
                 agentrl serve-env --env calculator --env lookup --host 127.0.0.1 --port 8123
  serve-controller
               one env-service URL in front of many serve-env workers: least-loaded dispatch, heartbeats
                 agentrl serve-controller --port 8200 --worker http://127.0.0.1:8123 --worker http://127.0.0.1:8124
  serve-vllm   start a vLLM server flagged for a recipe's policy (runtime LoRA, processed logprobs); then
               train with --policy.backend=vllm --policy.url=http://127.0.0.1:8000
                 agentrl serve-vllm --config recipes/quickstart.yaml --port 8000
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
    parser.add_argument("--envs", default="", help="comma-separated environments whose oracle conversations train "
                                                   "the tokenizer (default: all in the name table)")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.output, size=args.size, vocab_size=args.vocab_size, seed=args.seed,
                            env_names=[n for n in args.envs.split(",") if n] or None)
    print(f"wrote {args.size} model to {path}")


def list_envs(argv: list[str]) -> None:
    from agentrl.envs import make_env
    from environments import ENVIRONMENTS

    for name in ENVIRONMENTS:
        env = make_env(name)
        tools = ", ".join(t["function"]["name"] for t in env.tools())
        print(f"{name:<12} {env.version:<16} splits={env.split_sizes}  tools: {tools}")


SERVE_ENV_EXAMPLE = """examples:
  agentrl serve-env --env calculator --env lookup --port 8123
  agentrl serve-env --env my_pkg.envs:ShopEnv --env_kwargs 'my_pkg.envs:ShopEnv={"level": 2}' --port 0
  agentrl serve-env --env calculator --port 0 --controller http://127.0.0.1:8200   # join a controller
  # then, in a recipe:  envs: [{name: calculator, url: "http://127.0.0.1:8123"}]"""


def serve_env(argv: list[str]) -> None:
    import json

    from agentrl.envs.client import EnvServiceError
    from agentrl.envs.server import DEFAULT_MAX_REQUEST_BYTES, env_factories, serve
    from agentrl.envs.sessions import INLINE_BUDGET_S, INLINE_STRIKES, EnvService
    from agentrl.envs.wire import API_VERSION

    parser = argparse.ArgumentParser(prog="agentrl serve-env", epilog=SERVE_ENV_EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Serve environments' sessions over HTTP (API in docs/env-service.md; "
                                                 "OpenAPI at /openapi.json).")
    parser.add_argument("--env", action="append", required=True, metavar="NAME",
                        help="an environment in the name table or a module:Class path; repeat for more")
    parser.add_argument("--env_kwargs", action="append", default=[], metavar="NAME=JSON",
                        help="constructor arguments of the --env given as NAME, as a JSON object")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123, help="0 picks a free port (the printed URL says which)")
    parser.add_argument("--workers", type=int, default=16,
                        help="threads that run environment methods (sessions live in this one process)")
    parser.add_argument("--call_timeout", type=float, default=30.0, help="seconds one environment call may take")
    parser.add_argument("--session_ttl", type=float, default=600.0, help="seconds before an idle session expires")
    parser.add_argument("--max_sessions", type=int, default=10_000)
    parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--inline", action="append", default=[], metavar="NAME",
                        help="run the tool calls of the environment served as NAME in the event loop, not a worker "
                             "thread: faster for trivial tools, but --call_timeout cannot stop them "
                             f"({INLINE_STRIKES} calls in a row over {INLINE_BUDGET_S * 1000:g} ms send NAME back to "
                             "the threads); repeat for more")
    parser.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--controller", default="", metavar="URL",
                        help="an agentrl serve-controller to join once listening (and leave on shutdown)")
    parser.add_argument("--advertise_url", default="", metavar="URL",
                        help="this server's URL as the controller can reach it (default: the URL it listens on)")
    args = parser.parse_args(argv)
    if args.controller and not args.advertise_url and args.host in ("0.0.0.0", "::", ""):
        parser.error(f"--controller with --host {args.host!r}: give --advertise_url, the URL the controller can reach")
    kwargs: dict[str, dict] = {}
    for item in args.env_kwargs:
        name, sep, text = item.partition("=")
        if not sep or name not in args.env:
            parser.error(f"--env_kwargs {item!r}: want NAME=JSON with NAME one of the --env values {args.env}")
        try:
            kwargs[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            parser.error(f"--env_kwargs {item!r}: not JSON ({exc})")
        if not isinstance(kwargs[name], dict):
            parser.error(f"--env_kwargs {item!r}: want a JSON object")
    factories = env_factories([(name, kwargs.get(name, {})) for name in args.env])
    if not set(args.inline) <= set(factories):
        parser.error(f"--inline {sorted(set(args.inline) - set(factories))}: not served here; the served names are "
                     f"{sorted(factories)}")
    service = EnvService(factories, threads=args.workers, call_timeout=args.call_timeout,
                         session_ttl=args.session_ttl, max_sessions=args.max_sessions, inline=args.inline)
    names = ", ".join(service.prototypes)
    try:
        serve(service, args.host, args.port, max_request_bytes=args.max_request_bytes, log_level=args.log_level,
              announce=lambda url: print(f"agentrl serve-env: {names} at {url} (API {API_VERSION})", flush=True),
              controller=args.controller, advertise_url=args.advertise_url)
    except EnvServiceError as exc:  # the controller could not be reached or refused this worker
        raise SystemExit(f"agentrl serve-env: {exc}") from None


SERVE_CONTROLLER_EXAMPLE = """examples:
  agentrl serve-controller --port 8200 --worker http://127.0.0.1:8123 --worker http://127.0.0.1:8124
  agentrl serve-env --env calculator --port 0 --controller http://127.0.0.1:8200   # another worker joins
  curl http://127.0.0.1:8200/workers                                             # load and health
  curl -X DELETE http://127.0.0.1:8200/workers/w1                                # drain w1
  # then, in a recipe:  envs: [{name: calculator, url: "http://127.0.0.1:8200"}]"""


def serve_controller(argv: list[str]) -> None:
    from agentrl.envs.controller import EnvController
    from agentrl.envs.controller_server import describe_workers, serve_controller as serve
    from agentrl.envs.server import DEFAULT_MAX_REQUEST_BYTES
    from agentrl.envs.service_errors import ServiceError
    from agentrl.envs.wire import API_VERSION

    parser = argparse.ArgumentParser(prog="agentrl serve-controller", epilog=SERVE_CONTROLLER_EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="One env-service URL in front of many agentrl serve-env workers: "
                                                 "least-loaded dispatch, session affinity, heartbeats "
                                                 "(docs/env-service.md).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200, help="0 picks a free port (the printed URL says which)")
    parser.add_argument("--worker", action="append", default=[], metavar="URL",
                        help="a serve-env worker to join at start; repeat for more (workers may also join later "
                             "with POST /workers or serve-env --controller)")
    parser.add_argument("--heartbeat_interval", type=float, default=2.0, help="seconds between GET /health rounds")
    parser.add_argument("--heartbeat_timeout", type=float, default=2.0, help="seconds a heartbeat waits")
    parser.add_argument("--max_missed", type=int, default=3,
                        help="missed heartbeats in a row that mark a worker dead (a refused connection: at once)")
    parser.add_argument("--request_timeout", type=float, default=120.0,
                        help="seconds a forwarded request may take (keep it above the workers' --call_timeout)")
    parser.add_argument("--session_ttl", type=float, default=600.0,
                        help="seconds an idle session is remembered (keep it >= the workers' --session_ttl)")
    parser.add_argument("--forget_dead_after", type=float, default=600.0,
                        help="seconds after which a dead worker leaves the list")
    parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        controller = EnvController(args.worker, heartbeat_interval=args.heartbeat_interval,
                                   heartbeat_timeout=args.heartbeat_timeout, max_missed=args.max_missed,
                                   request_timeout=args.request_timeout, session_ttl=args.session_ttl,
                                   forget_dead_after=args.forget_dead_after)
    except ServiceError as exc:  # a --worker that is no URL
        parser.error(exc.message)
    except ValueError as exc:
        parser.error(str(exc))

    def announce(url: str) -> None:
        workers = controller.pool.list_workers()
        print(f"agentrl serve-controller: at {url} (API {API_VERSION}), {len(workers)} workers", flush=True)
        if workers:
            print(describe_workers(workers), flush=True)

    try:
        serve(controller, args.host, args.port, announce=announce, max_request_bytes=args.max_request_bytes,
              log_level=args.log_level)
    except ServiceError as exc:  # a --worker disagrees with the others
        raise SystemExit(f"agentrl serve-controller: {exc.kind}: {exc.message}") from None


def serve_vllm(argv: list[str]) -> None:
    """Run the vLLM server a recipe's ``policy.backend: vllm`` needs, in the foreground, until interrupted."""
    import os

    from agentrl.config import load_recipe
    from agentrl.policy.vllm import VLLMServer, server_env

    parser = argparse.ArgumentParser(prog="agentrl serve-vllm")
    parser.add_argument("--config", default=None, help="the recipe (its model, lora.r and policy section)")
    parser.add_argument("--model", default="", help="serve this model directory instead of the recipe's start")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--print_only", action="store_true", help="print the command and exit")
    args, overrides = parser.parse_known_args(argv)
    recipe = load_recipe(args.config, overrides)
    model = args.model
    if not model:
        # adapters are trained on the model GRPO starts from: the SFT output when the recipe has a warm start
        model = os.path.join(recipe.train.output_dir, "sft") if recipe.sft.enabled else recipe.model.path
    if not args.print_only and not os.path.isdir(model):
        raise SystemExit(f"agentrl serve-vllm: no model at {model} (run SFT first, or give --model DIR; "
                         f"policy.launch=true starts a server after SFT by itself)")
    server = VLLMServer(model, python=recipe.policy.python, host=args.host, port=args.port,
                        max_lora_rank=recipe.lora.r, max_loras=recipe.policy.max_loras, dtype=recipe.policy.dtype,
                        extra_args=recipe.policy.server_args)
    command = server.command()
    print(" ".join(command), flush=True)
    if args.print_only:
        return
    os.execve(command[0], command, server_env())


def train(argv: list[str]) -> None:
    from agentrl.train.cli import main as train_main

    train_main(argv)


def evaluate(argv: list[str]) -> None:
    from agentrl.eval.cli import main as eval_main

    eval_main(argv)


COMMANDS = {"tiny-model": tiny_model, "train": train, "eval": evaluate, "envs": list_envs, "serve-env": serve_env,
            "serve-controller": serve_controller, "serve-vllm": serve_vllm}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"agentrl: unknown command {command!r}\n\n{USAGE}")
    COMMANDS[command](rest)


if __name__ == "__main__":
    main()
