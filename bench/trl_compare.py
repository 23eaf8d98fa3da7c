"""agentrl against trl's ``GRPOTrainer``: the same tiny model, environment and settings on CPU.

Both sides start from the same SFT warm-started tiny Qwen2 (``--model``, by default the quickstart's
``runs/quickstart/sft``), train a fresh LoRA adapter with GRPO on agentrl's ``calculator`` environment as
``recipes/quickstart.yaml`` configures it, for the same number of steps, on the same task instances in the same
order, with the same rewards. Each side runs in its own process, one after the other, with the same
``OMP_NUM_THREADS``:

- **agentrl**: its own trainer, launched as the README launches it
  (``accelerate launch --config_file recipes/accelerate/cpu_1proc.yaml -m agentrl.train --config
  recipes/quickstart.yaml``), only with recipe overrides: the model, SFT off, the calculator alone, the step count,
  no saves or evaluation. The figures come from its ``metrics.jsonl``.
- **trl**: ``GRPOTrainer`` with ``environment_factory``. The factory builds an adapter (:class:`TRLEnvAdapter`)
  around a fresh instance of the very same agentrl environment: ``reset`` resets it on the row's task and returns
  the question, the environment's tools become the adapter's methods (trl derives their schemas from signatures
  and docstrings, which are made to reproduce agentrl's schemas exactly), every call goes through the
  environment's ``step`` (so bad calls get the same error observations) and ``get_reward`` returns the reward the
  environment gave when the episode finished (0 when it did not). The dataset holds the tasks agentrl's
  ``TaskSampler`` draws, in its order, so step ``k`` rolls out the same 8 questions on both sides.

Settings are read from the same recipe object on both sides: group size, tasks per step, temperature, the
per-turn token budget (trl: ``generation_kwargs={"max_new_tokens": ...}``), the turn limit (trl:
``max_tool_calling_iterations = max_turns - 1``), the total token budget (trl: ``max_completion_length =
max_total_tokens - longest prompt``), learning rate (constant), LoRA rank/alpha/targets, the clip range (DAPO
clip-higher: ``epsilon``/``epsilon_high``), token-level loss over the batch's tokens (trl ``loss_type="dapo"``),
micro-batch size (trl ``per_device_train_batch_size``, with gradient accumulation so one optimizer step per 64
trajectories), fp32, no KL, seed. Advantages: agentrl subtracts the group mean and divides by the task's running
std; trl subtracts the group mean and divides by the batch std (``scale_rewards="batch"``), the closest it has for
one task.

What is timed: the training phase only, from the first step's start to the last step's end (agentrl: the sum of
its ``time/step``; trl: from ``on_train_begin`` to the last ``on_step_end``). Model loading, process start,
the final save and logging outside the steps are excluded; the process wall times, which include them, are
printed as well. Trajectories per second = trajectories / training-phase seconds. Reward "at an equal number of
samples" is the mean rollout reward per step at the same step counts (so the same number of trajectories seen).

The sides alternate for ``--rounds`` rounds and the table shows medians. A run during which other processes took
more than ``--max-other-cores`` of CPU (measured from /proc/stat) is marked and left out of the medians: with as
many OpenMP threads as cores, a fraction of a core taken by another job stalls every thread, and the two trainers
do not slow down alike.

The figures, their conditions and what dominates them: docs/benchmarks.md.

Usage:
    bash launch/quickstart.sh                 # once: builds runs/quickstart/sft (the warm-started model)
    .venv/bin/python bench/trl_compare.py     # 3 rounds x 10 steps x 64 trajectories a side, ~11 min on 2 cores
    .venv/bin/python bench/trl_compare.py --rounds 1 --steps 20 --threads 2 --output runs/bench/trl_compare
    .venv/bin/python bench/trl_compare.py --agentrl_args "--rollout.max_batch=32"   # agentrl-only overrides
    .venv/bin/python bench/trl_compare.py --report runs/bench/trl_compare/results.json  # the table again
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `agentrl` and `environments` importable from the checkout
    sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "quickstart.yaml"
ACCELERATE_CONFIG = ROOT / "recipes" / "accelerate" / "cpu_1proc.yaml"
ENV_NAME = "calculator"  # the quickstart environment both sides train on
JSON_TYPES: dict[str, type] = {"string": str, "number": float, "integer": int, "boolean": bool, "array": list,
                               "object": dict}
RESERVED = ("reset", "get_reward")  # methods trl's environment_factory does not expose as tools


# --- the trl environment adapter ---------------------------------------------------------------------------------
class TRLEnvAdapter:
    """One agentrl environment instance in the shape trl's ``environment_factory`` expects.

    trl calls ``reset(**row)`` before each rollout (a returned string is appended to the row's last user message),
    exposes every public method except ``reset`` and ``get_reward`` as a tool (schemas derived from the methods'
    signatures and Google-style docstrings), calls tools with the parsed JSON arguments as keywords, turns the
    returned value into the tool message, and calls ``get_reward()`` once per finished rollout. It has no notion of an
    episode ending: the model generates again after every tool result until it answers without a tool call or
    the turn/token limits stop it.

    Use :func:`trl_environment_class` to get a subclass with the environment's tools as methods; this base holds
    the behaviour.

    Args:
        env: an agentrl environment (``reset(task)``, ``step(call)``, ``task_at(split, index)``).
        split: the split a row's ``task_index`` refers to.
    """

    def __init__(self, env: Any, split: str = "train") -> None:
        self.env, self.split = env, split
        self.task = None
        self.reward, self.done, self.calls = 0.0, False, 0

    def reset(self, task_index: int, **row: Any) -> str:
        """Start the episode on task ``task_index``; return the question (the opening user message)."""
        self.task = self.env.task_at(self.split, int(task_index))
        messages = self.env.reset(self.task)
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"{self.env.name}: the opening messages must end with the user's message")
        self.reward, self.done, self.calls = 0.0, False, 0
        return messages[-1]["content"]

    def get_reward(self) -> float:
        """The reward the environment gave when the episode finished; 0.0 if it never finished."""
        return self.reward

    def _call(self, name: str, arguments: dict[str, Any]) -> str:
        from agentrl.types import ToolCall

        self.calls += 1
        result = self.env.step(ToolCall(name, arguments))
        if result.done and not self.done:
            self.done, self.reward = True, float(result.reward)
        return result.observation


def _tool_method(spec: dict[str, Any]) -> Callable[..., str]:
    """A method whose signature and docstring make transformers' ``get_json_schema`` give back ``spec``."""
    function = spec["function"]
    name = function["name"]
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties", {})
    required = set(parameters.get("required", []))

    def method(self: TRLEnvAdapter, **arguments: Any) -> str:
        return self._call(name, arguments)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations: dict[str, Any] = {}
    doc_args = []
    for arg, schema in properties.items():
        kind = JSON_TYPES.get(schema.get("type"), str)
        default = inspect.Parameter.empty if arg in required else None
        params.append(inspect.Parameter(arg, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind))
        annotations[arg] = kind
        doc_args.append(f"    {arg}: {schema.get('description') or arg}")
    method.__name__ = method.__qualname__ = name
    method.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    method.__annotations__ = annotations
    doc = function.get("description") or name
    method.__doc__ = doc + ("\n\nArgs:\n" + "\n".join(doc_args) if doc_args else "")
    return method


def trl_environment_class(tools: list[dict[str, Any]], class_name: str = "AgentrlEnv") -> type[TRLEnvAdapter]:
    """A :class:`TRLEnvAdapter` subclass with one method per tool in ``tools`` (agentrl ``ToolSpec`` dicts).

    trl names the reward column after the class, so ``class_name`` shows up in its logs.
    """
    methods = {}
    for spec in tools:
        name = spec["function"]["name"]
        if name in RESERVED or name.startswith("_") or hasattr(TRLEnvAdapter, name):
            raise ValueError(f"tool {name!r} cannot be a trl environment method (reserved or private name)")
        methods[name] = _tool_method(spec)
    return type(class_name, (TRLEnvAdapter,), methods)


def trl_tool_schemas(env_class: type) -> list[dict[str, Any]]:
    """The tool schemas trl renders for ``env_class``: its public methods, through ``get_json_schema``."""
    from transformers.utils import get_json_schema

    return [get_json_schema(fn) for name, fn in inspect.getmembers(env_class, predicate=inspect.isfunction)
            if name not in RESERVED and not name.startswith("_")]


def dataset_rows(tasks: list[Any], opening: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trl dataset rows: the opening messages with an empty user message (reset fills it in), and the task index."""
    prompt = [dict(m) for m in opening[:-1]] + [{"role": "user", "content": ""}]
    return [{"prompt": prompt, "task_index": task.index} for task in tasks]


# --- shared settings ---------------------------------------------------------------------------------------------
def env_entry() -> dict[str, Any]:
    """The quickstart recipe's calculator entry (name, weight, reward, kwargs)."""
    for entry in yaml_load(RECIPE)["envs"]:
        if entry["name"] == ENV_NAME:
            return entry
    raise SystemExit(f"{RECIPE} has no {ENV_NAME!r} environment")


def common_overrides(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """Recipe overrides both sides share (agentrl gets them on its command line, trl reads the same recipe)."""
    return [f"--model.path={args.model}", "--model.build=null", "--sft.enabled=false",
            f"--envs={json.dumps([env_entry()])}",  # JSON is YAML: a one-element list, the calculator only
            f"--train.steps={args.steps}", f"--train.seed={args.seed}", f"--train.output_dir={output_dir}",
            "--train.save_every=0", "--eval.at_end=false", "--train.eval_every=0"]


def yaml_load(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def thread_env(threads: int) -> dict[str, str]:
    """The environment both sides run in: the same thread count, the checkout importable, trl's notice off."""
    env = dict(os.environ)
    path = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=os.pathsep.join(path))
    return env


class CPUWatch:
    """How much CPU other processes used while a side ran: machine busy time from /proc/stat minus our children's."""

    def __init__(self) -> None:
        self.start_busy, self.start_children, self.start = self._busy(), self._children(), time.time()
        self.load_before = os.getloadavg()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _children() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> dict[str, Any]:
        wall = time.time() - self.start
        ours = self._children() - self.start_children
        busy = self._busy()
        others = None if busy is None or self.start_busy is None else max(0.0, busy - self.start_busy - ours)
        return {"process_wall_s": wall, "process_cpu_s": ours,
                "other_processes_cores": None if others is None else others / wall,
                "loadavg_before": list(self.load_before), "loadavg_after": list(os.getloadavg())}


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    print(f"$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    watch = CPUWatch()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    stats = watch.stop()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"command failed with exit code {rc}; last lines of {log}:\n{tail}")
    return stats


# --- the agentrl side --------------------------------------------------------------------------------------------
def accelerate_command() -> list[str]:
    script = Path(sys.executable).parent / "accelerate"
    return [str(script), "launch"] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def run_agentrl(args: argparse.Namespace, out: Path, suffix: str = "") -> dict[str, Any]:
    side = out / "agentrl"
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    cmd = [*accelerate_command(), "--config_file", str(ACCELERATE_CONFIG), "-m", "agentrl.train",
           "--config", str(RECIPE), *common_overrides(args, side), *shlex.split(args.agentrl_args)]
    stats = run_logged(cmd, out / f"agentrl{suffix}.log", thread_env(args.threads))
    records = [json.loads(line) for line in (side / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rollout = yaml_load(side / "recipe.yaml")["rollout"]  # the settings the run used, overrides included
    steps = [r for r in records if "rollout/episodes" in r]
    if len(steps) != args.steps:
        raise SystemExit(f"agentrl logged {len(steps)} training steps, expected {args.steps} ({side}/metrics.jsonl)")
    per_step = [{"step": r["step"], "time": r["time/step"], "rollout_time": r["time/rollout"],
                 "trajectories": int(r["rollout/episodes"]), "reward": r[f"rollout/{ENV_NAME}/reward"],
                 "turns": r.get(f"rollout/{ENV_NAME}/turns"), "truncated": r.get(f"rollout/{ENV_NAME}/truncated"),
                 "informative": r.get("adv/informative_frac"),
                 "equal_reward_groups": r["adv/all_equal_groups"] / rollout["tasks_per_step"]
                 if "adv/all_equal_groups" in r else None}
                for r in steps]
    return {"command": shlex.join(cmd), "steps": per_step, **stats}


# --- the trl side (runs in its own process: `--trl-worker`) ------------------------------------------------------
def trl_settings(args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any], list[Any], list[dict]]:
    """The recipe both sides use, the trl knobs derived from it, the task sequence and the env's opening messages."""
    from agentrl.config import load_recipe
    from agentrl.envs import make_env
    from agentrl.rollout.sampler import TaskSampler

    recipe = load_recipe(RECIPE, common_overrides(args, out / "agentrl"))
    (entry,) = recipe.envs
    prototype = make_env(entry.name, **entry.kwargs)
    sampler = TaskSampler({entry.name: lambda i: prototype.task_at("train", i)},
                          {entry.name: prototype.split_sizes["train"]}, {entry.name: entry.weight},
                          seed=recipe.train.seed)
    tasks = [t for _ in range(recipe.train.steps) for t in sampler.sample(recipe.rollout.tasks_per_step)]
    rollout, algo = recipe.rollout, recipe.algo
    per_step = rollout.tasks_per_step * rollout.group_size
    if per_step % algo.micro_batch_size:
        raise SystemExit(f"{per_step} trajectories per step must divide by algo.micro_batch_size")
    if algo.task_norm and algo.scale_by_std:
        raise SystemExit("no trl equivalent for scale_by_std together with task_norm")
    knobs = {
        "num_generations": rollout.group_size,
        "per_device_train_batch_size": algo.micro_batch_size,
        "gradient_accumulation_steps": per_step // algo.micro_batch_size,  # one optimizer step per generation
        "temperature": rollout.temperature,
        "top_p": 1.0, "top_k": 0,  # plain sampling, as agentrl's hf policy
        "generation_kwargs": {"max_new_tokens": rollout.max_new_tokens},  # per turn (trl: per generate call)
        "max_tool_calling_iterations": rollout.max_turns - 1,  # trl counts tool rounds after the first turn
        "learning_rate": algo.lr, "warmup_steps": algo.warmup_steps,  # agentrl: linear warmup, then constant
        "lr_scheduler_type": "constant_with_warmup" if algo.warmup_steps else "constant",
        "weight_decay": algo.weight_decay, "max_grad_norm": algo.max_grad_norm,
        "epsilon": algo.clip_low, "epsilon_high": algo.clip_high, "beta": algo.kl_coef,
        "num_iterations": algo.epochs, "loss_type": "dapo",
        "scale_rewards": "group" if algo.scale_by_std else ("batch" if algo.task_norm else "none"),
        "seed": recipe.train.seed, "max_steps": recipe.train.steps,
    }
    return recipe, knobs, tasks, prototype.reset(tasks[0])


def run_trl_worker(args: argparse.Namespace) -> None:
    t_process = time.time()
    out = Path(args.output)
    side = out / "trl"
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agentrl.envs import make_env

    recipe, knobs, tasks, opening = trl_settings(args, out)
    (entry,) = recipe.envs
    prototype = make_env(entry.name, **entry.kwargs)
    env_class = trl_environment_class(prototype.tools(), class_name=f"{type(prototype).__name__}ForTRL")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    longest = max(len(tokenizer.apply_chat_template(prototype.reset(t), tools=prototype.tools(), tokenize=True,
                                                    add_generation_prompt=True, return_dict=False)) for t in tasks)
    rendered_agentrl = tokenizer.apply_chat_template(opening, tools=prototype.tools(), tokenize=False,
                                                     add_generation_prompt=True)
    rendered_trl = tokenizer.apply_chat_template(opening, tools=trl_tool_schemas(env_class), tokenize=False,
                                                 add_generation_prompt=True)
    if rendered_agentrl != rendered_trl:
        raise SystemExit("trl would render a different prompt than agentrl (tool schemas differ):\n"
                         f"{rendered_agentrl}\n---\n{rendered_trl}")

    def factory() -> TRLEnvAdapter:
        return env_class(make_env(entry.name, **entry.kwargs))

    lora = recipe.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    config = GRPOConfig(
        output_dir=str(side), **knobs,
        max_completion_length=recipe.rollout.max_total_tokens - longest,
        shuffle_dataset=False,  # the dataset is already in agentrl's sampler order
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        model_init_kwargs={"dtype": torch.float32},
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
    )
    dataset = Dataset.from_list(dataset_rows(tasks, opening))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.step_ends, self.logs = None, [], []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.begin = time.time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.step_ends.append(time.time())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "reward" in logs:
                self.logs.append({"step": state.global_step, **logs})

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that also records how long its rollouts take and how many turns it generates."""

        bench_rollout_times: list[float] = []
        bench_generate_calls: list[dict[str, Any]] = []  # one per batched generate call
        bench_samples: list[str] = []  # a few whole completions (turns and tool results), as text
        bench_equal_groups: list[float] = []  # share of groups whose rewards are all equal, per step

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.time()
            result = super()._generate_and_score_completions(inputs)
            self.bench_rollout_times.append(time.time() - t0)
            rewards, size = [env.reward for env in self.environments], self.num_generations
            groups = [rewards[i:i + size] for i in range(0, len(rewards), size)]
            self.bench_equal_groups.append(sum(len(set(g)) == 1 for g in groups) / len(groups))
            return result

        def _generate(self, prompts: list) -> Any:
            result = super()._generate(prompts)
            if len(self.bench_samples) < 4:
                self.bench_samples += [tokenizer.decode(ids) for ids in result[1][:2]]
            return result

        def _generate_single_turn(self, prompt_ids: Any, *a: Any, **k: Any) -> Any:
            t0 = time.time()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *a, **k)
            self.bench_generate_calls.append({
                "step": self.state.global_step + 1, "rows": len(prompt_ids), "seconds": time.time() - t0,
                "prompt_width": max(len(p) for p in prompt_ids),
                "new_tokens_max": max(len(c) for c in completion_ids),
                "new_tokens_mean": sum(len(c) for c in completion_ids) / len(completion_ids)})
            return completion_ids, logprobs

    clock = Clock()
    trainer = TimedGRPOTrainer(model=str(args.model), args=config, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=peft_config, environment_factory=factory,
                               callbacks=[clock])
    t_init = time.time()
    trainer.train()
    if len(clock.step_ends) != args.steps or len(clock.logs) != args.steps:
        raise SystemExit(f"trl ran {len(clock.step_ends)} steps and logged {len(clock.logs)}, expected {args.steps}")
    per_step_trajectories = knobs["per_device_train_batch_size"] * knobs["gradient_accumulation_steps"]
    reward_key = f"rewards/{env_class.__name__}/mean"
    starts = [clock.begin, *clock.step_ends[:-1]]
    per_step = [{"step": i + 1, "time": end - start, "rollout_time": rollout_s,
                 "trajectories": per_step_trajectories, "reward": log[reward_key],
                 "completion_tokens": log.get("completions/mean_length"),
                 "tool_calls": log.get("tools/call_frequency"), "clipped": log.get("completions/clipped_ratio"),
                 # trl's own frac_reward_zero_std tests the batch std under scale_rewards="batch", so count here
                 "equal_reward_groups": equal}
                for i, (start, end, rollout_s, equal, log) in enumerate(
                    zip(starts, clock.step_ends, trainer.bench_rollout_times, trainer.bench_equal_groups, clock.logs))]
    calls = trainer.bench_generate_calls
    turns = sum(c["rows"] for c in calls) / (per_step_trajectories * args.steps)  # rows generated per trajectory
    result = {"steps": per_step, "turns_per_trajectory": turns,
              "generate_calls": calls, "sample_completions": trainer.bench_samples,
              "settings": {**knobs, "max_completion_length": config.max_completion_length},
              "startup_s": clock.begin - t_process, "init_s": t_init - t_process,
              "versions": {name: __import__(name).__version__ for name in ("torch", "transformers", "trl", "peft")}}
    side.mkdir(parents=True, exist_ok=True)
    (side / "result.json").write_text(json.dumps(result, indent=1))


def run_trl(args: argparse.Namespace, out: Path, suffix: str = "") -> dict[str, Any]:
    side = out / "trl"
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--model", str(args.model),
           "--output", str(out), "--steps", str(args.steps), "--seed", str(args.seed)]
    stats = run_logged(cmd, out / f"trl{suffix}.log", thread_env(args.threads))
    return {"command": shlex.join(cmd), **json.loads((side / "result.json").read_text()), **stats}


# --- the report --------------------------------------------------------------------------------------------------
def summarize(run: dict[str, Any], last: int) -> dict[str, Any]:
    """One run's figures: throughput over all steps and without the first (warm-up) step, rewards, times."""
    steps = run["steps"]
    train_s = sum(s["time"] for s in steps)
    trajectories = sum(s["trajectories"] for s in steps)
    rollout_s = sum(s["rollout_time"] for s in steps)
    later = steps[1:] or steps
    return {"trajectories": trajectories, "train_s": train_s, "trajectories_per_s": trajectories / train_s,
            "trajectories_per_s_after_step_1": sum(s["trajectories"] for s in later) / sum(s["time"] for s in later),
            "first_step_s": steps[0]["time"],
            "rollout_s_per_step": rollout_s / len(steps), "update_s_per_step": (train_s - rollout_s) / len(steps),
            "reward_mean": statistics.fmean(s["reward"] for s in steps),
            "reward_first": statistics.fmean(s["reward"] for s in steps[:last]),
            "reward_last": statistics.fmean(s["reward"] for s in steps[-last:]),
            "turns_per_trajectory": run.get("turns_per_trajectory")
            or _mean([s.get("turns") for s in steps]),
            "equal_reward_groups": _mean([s.get("equal_reward_groups") for s in steps]),
            # agentrl trains only on groups whose rewards differ; trl runs every trajectory through the loss
            "trained_share": _mean([s.get("informative") for s in steps]) if "informative" in steps[0] else 1.0,
            "process_wall_s": run["process_wall_s"], "other_processes_cores": run["other_processes_cores"]}


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def trl_turn_line(run: dict[str, Any]) -> str:
    """trl's batched generate calls by turn (1 = the first assistant turn), averaged over steps 2-N."""
    by_turn: dict[int, list[dict[str, Any]]] = {}
    if not run.get("generate_calls"):
        return "trl generate calls: not recorded"
    steps = sorted({c["step"] for c in run["generate_calls"]})
    for step in steps[1:] or steps:
        for turn, call in enumerate((c for c in run["generate_calls"] if c["step"] == step), start=1):
            by_turn.setdefault(turn, []).append(call)
    parts = [f"turn {turn}: {_mean([c['rows'] for c in calls]):.0f} rows, {_mean([c['seconds'] for c in calls]):.2f} s,"
             f" longest {_mean([c['new_tokens_max'] for c in calls]):.0f} tokens"
             for turn, calls in sorted(by_turn.items())]
    return "trl generate calls per step (mean over steps 2-N; first undisturbed run):\n  " + "\n  ".join(parts)


def report(results: dict[str, Any], last: int, max_other: float = 0.1) -> str:
    """The comparison table and the reward per step; stores the summaries in ``results``.

    Figures are medians over the runs during which other processes used at most ``max_other`` cores (all runs
    when none qualifies, with a warning): with as many OpenMP threads as cores, a process that takes part of a
    core stalls every thread, and the two trainers do not suffer from it equally.
    """
    sides = [s for s in ("agentrl", "trl") if results["runs"].get(s)]
    per_run = {s: [summarize(run, last) for run in results["runs"][s]] for s in sides}
    disturbed = {s: [(r["other_processes_cores"] or 0.0) > max_other for r in per_run[s]] for s in sides}
    used = {s: [r for r, bad in zip(per_run[s], disturbed[s]) if not bad] or per_run[s] for s in sides}
    summary = {s: {k: _median([r[k] for r in used[s]]) for k in used[s][0]} for s in sides}
    n = len(results["runs"][sides[0]][0]["steps"])
    rows = [("trajectories", "{:.0f}", "trajectories"),
            ("training phase, s", "{:.1f}", "train_s"),
            ("trajectories / s", "{:.2f}", "trajectories_per_s"),
            ("trajectories / s, steps 2-N", "{:.2f}", "trajectories_per_s_after_step_1"),
            ("first step, s", "{:.1f}", "first_step_s"),
            ("rollout s / step", "{:.2f}", "rollout_s_per_step"),
            ("update s / step", "{:.2f}", "update_s_per_step"),
            ("model turns / trajectory", "{:.2f}", "turns_per_trajectory"),
            ("groups with equal rewards", "{:.2f}", "equal_reward_groups"),
            ("share of trajectories trained on", "{:.2f}", "trained_share"),
            (f"mean reward, steps 1-{n}", "{:.3f}", "reward_mean"),
            *([(f"mean reward, steps 1-{last}", "{:.3f}", "reward_first"),
               (f"mean reward, steps {n - last + 1}-{n}", "{:.3f}", "reward_last")] if n > last else []),
            ("process wall (with startup), s", "{:.1f}", "process_wall_s"),
            ("other processes' CPU, cores", "{:.2f}", "other_processes_cores")]
    both = len(sides) == 2
    lines = [f"{'':34}" + "".join(f"{s:>12}" for s in sides) + ("  agentrl/trl" if both else "")]
    for label, fmt, key in rows:
        values = [summary[s][key] for s in sides]
        cells = "".join(f"{'-' if v is None else fmt.format(v):>12}" for v in values)
        ratio = ""
        if both and key.startswith("trajectories_per_s") and values[1]:
            ratio = f"{values[0] / values[1]:>12.2f}x"
        lines.append(f"{label:34}{cells}{ratio}")
    head = [f"trajectories / s per run (other processes' CPU, cores); * = disturbed (> {max_other} cores), "
            "left out of the medians below:"]
    for s in sides:
        head.append(f"  {s:8} " + ", ".join(f"{r['trajectories_per_s']:.2f} ({r['other_processes_cores'] or 0:.2f})"
                                             + ("*" if bad else "") for r, bad in zip(per_run[s], disturbed[s])))
        if all(disturbed[s]):
            head.append(f"  WARNING: every {s} run was disturbed; its figures below are not reliable")
    lines = head + lines
    if "trl" in sides:
        first_clean = next((run for run, bad in zip(results["runs"]["trl"], disturbed["trl"]) if not bad),
                           results["runs"]["trl"][0])
        lines += ["", trl_turn_line(first_clean)]
    lines += ["", "reward per step (mean over the step's 64 trajectories; first run of each):",
              "step " + "".join(f"{s:>10}" for s in sides)]
    for i in range(n):
        lines.append(f"{i + 1:>4} " + "".join(f"{results['runs'][s][0]['steps'][i]['reward']:>10.3f}" for s in sides))
    results["summary"] = summary
    if both:
        results["summary"]["ratio_trajectories_per_s"] = (summary["agentrl"]["trajectories_per_s"]
                                                          / summary["trl"]["trajectories_per_s"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "quickstart" / "sft",
                        help="the SFT warm-started model both sides start from (bash launch/quickstart.sh builds it)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench" / "trl_compare",
                        help="its agentrl/ and trl/ subfolders are replaced on every run")
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per side (64 trajectories each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS for both sides")
    parser.add_argument("--rounds", type=int, default=3,
                        help="run the sides this many times, alternating; the table shows medians")
    parser.add_argument("--last", type=int, default=3, help="steps averaged for the final reward")
    parser.add_argument("--only", choices=("both", "agentrl", "trl"), default="both")
    parser.add_argument("--agentrl_args", default="", help="extra agentrl recipe overrides (agentrl side only)")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="runs during which other processes used more CPU than this are left out of the medians")
    parser.add_argument("--report", type=Path, help="print the table of a results.json written earlier, run nothing")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        print(f"{results['date']}, {results['cpus']} CPUs, OMP_NUM_THREADS={results['threads']}, "
              f"load average at start {results['loadavg_at_start'][0]:.2f}")
        print(report(results, args.last, args.max_other_cores))
        return
    args.model = args.model.resolve()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run `bash launch/quickstart.sh` first (it builds "
                         "runs/quickstart/sft), or pass --model DIR")
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be at least 1")
    if args.trl_worker:
        run_trl_worker(args)
        return
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
                               "threads": args.threads, "steps": args.steps, "seed": args.seed,
                               "rounds": args.rounds, "model": str(args.model), "agentrl_args": args.agentrl_args,
                               "command": shlex.join([sys.executable, *sys.argv]),
                               "loadavg_at_start": list(os.getloadavg()), "runs": {"agentrl": [], "trl": []}}
    for round_ in range(1, args.rounds + 1):
        suffix = f"-{round_}" if args.rounds > 1 else ""
        if args.only in ("both", "agentrl"):
            results["runs"]["agentrl"].append(run_agentrl(args, out, suffix))
        if args.only in ("both", "trl"):
            results["runs"]["trl"].append(run_trl(args, out, suffix))
    table = report(results, args.last, args.max_other_cores)
    print(f"\n{results['date']}, {results['cpus']} CPUs, OMP_NUM_THREADS={args.threads}, "
          f"load average at start {results['loadavg_at_start'][0]:.2f}")
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nfigures: {out / 'results.json'}")


if __name__ == "__main__":
    main()
