"""The GRPO training loop, top to bottom: collect → score → advantages → batch → update → sync → save.

Run it with ``accelerate launch -m agentrl.train --config recipes/quickstart.yaml [--section.key=value ...]``.
Every process rolls out its share of the step's task instances with the in-process policy (the very model
being trained, so a new adapter version is live without a copy); advantages are computed on the gathered
rewards so every process holds the same per-task statistics.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from agentrl.algo.advantages import TaskAdvantageStats, compute_advantages
from agentrl.config import VLLM_LORA_RANKS, ConfigError, Recipe, recipe_to_dict
from agentrl.eval.runner import eval_tasks, summarize
from agentrl.policy.base import SamplingParams
from agentrl.policy.hf import HFPolicy
from agentrl.policy.vllm import VLLMPolicy, VLLMServer
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episodes
from agentrl.rollout.engine import RolloutEngine
from agentrl.rollout.sampler import TaskSampler
from agentrl.train.batch import collate
from agentrl.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from agentrl.train.metrics import MetricsLogger
from agentrl.train.setup import EnvSuite, add_envs, add_lora, build_envs, ensure_base_model, load_model
from agentrl.train.sft import run_sft
from agentrl.train.update import param_sync_gap, policy_update
from agentrl.types import Task, Trajectory


def score(trajectories: list[Trajectory], suite: EnvSuite) -> None:
    """Apply each task's reward function, less the environment's truncation penalty for an episode that ran
    out of turns or tokens; a reward that raises marks the episode as an error."""
    for traj in trajectories:
        if not traj.scored:
            continue
        try:
            traj.reward = float(suite.rewards[traj.task.env](traj, traj.task))
        except Exception as exc:  # the episode boundary: recorded, excluded, counted
            traj.status, traj.error = "env_error", f"reward failed: {type(exc).__name__}: {exc}"
            continue
        if traj.status == "truncated":
            traj.reward -= suite.truncation_penalties.get(traj.task.env, 0.0)


class StepPlanner:
    """Which task instances each step rolls out on this process, with the sampler state before each step.

    Every process draws the same ``tasks_per_step`` instances and keeps its slice; group ids are unique across
    steps, because an asynchronous batch can hold groups admitted for different steps.
    """

    def __init__(self, sampler: TaskSampler, tasks_per_step: int, rank: int, world: int) -> None:
        self.sampler, self.tasks_per_step, self.rank, self.world = sampler, tasks_per_step, rank, world
        self._before: dict[int, dict[str, Any]] = {}

    def __call__(self, step: int) -> list[tuple[int, Task]]:
        self._before[step] = self.sampler.state_dict()
        tasks = self.sampler.sample(self.tasks_per_step)
        base = step * self.tasks_per_step
        return [(base + self.rank + self.world * j, task) for j, task in enumerate(tasks[self.rank::self.world])]

    async def state_before(self, step: int) -> dict[str, Any]:
        """The sampler state that re-draws ``step``'s instances (run on the engine loop: no plan is half done)."""
        for old in [s for s in self._before if s < step]:
            del self._before[old]
        return self._before.get(step) or self.sampler.state_dict()

    async def observe(self, groups: dict[str, tuple[int, int]]) -> None:
        """Hand a step's informative-group counts to the sampler (run on the engine loop, as the plans are)."""
        self.sampler.observe(groups)


def informative_groups(records: list[dict[str, Any]], informative: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{env: (groups with differing rewards, groups)}`` of a step; a group with no scored episode is left out."""
    groups: dict[int, tuple[str, bool]] = {}
    for record, flag in zip(records, informative.tolist()):
        if record["scored"]:
            env, seen = groups.get(record["group"], (record["task"], False))
            groups[record["group"]] = (env, seen or flag)
    out: dict[str, tuple[int, int]] = {}
    for env, flag in groups.values():
        hits, total = out.get(env, (0, 0))
        out[env] = (hits + flag, total + 1)
    return out


def rollout_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out: dict[str, float] = {}
    for task, rs in sorted(by_task.items()):
        scored = [r for r in rs if r["scored"]]
        n = max(len(scored), 1)
        out[f"rollout/{task}/reward"] = sum(r["reward"] for r in scored) / n
        out[f"rollout/{task}/success"] = sum(r["success"] for r in scored) / n
        out[f"rollout/{task}/turns"] = sum(r["turns"] for r in rs) / len(rs)
        out[f"rollout/{task}/truncated"] = sum(r["status"] == "truncated" for r in rs) / len(rs)
    out["rollout/infra_errors"] = float(sum(not r["scored"] for r in records))
    out["rollout/env_errors"] = float(sum(r["status"] == "env_error" for r in records))
    out["rollout/policy_errors"] = float(sum(r["status"] == "policy_error" for r in records))
    out["rollout/episodes"] = float(len(records))
    return out


def check_policy_setup(recipe: Recipe) -> None:
    """Fail fast on a vLLM setup that cannot work: an adapter rank vLLM refuses, no vLLM environment."""
    pcfg = recipe.policy
    if pcfg.backend != "vllm":
        return
    if recipe.lora.r not in VLLM_LORA_RANKS:
        raise ConfigError(f"lora.r={recipe.lora.r}: vLLM serves adapters of rank {VLLM_LORA_RANKS} only")
    if pcfg.launch and not Path(pcfg.python).exists():
        raise ConfigError(f"policy.python={pcfg.python!r} does not exist: run `bash launch/setup_vllm.sh`, or set "
                          "policy.python to the interpreter of an environment with vllm installed")


def make_policy(recipe: Recipe, peft_model, tokenizer, base: Path, accelerator: Accelerator):
    """The rollout policy, and the vLLM server started for it (None when not launched here)."""
    pcfg = recipe.policy
    asynchronous = recipe.rollout.max_staleness > 0
    if pcfg.backend == "hf":
        # synchronous: serve the very module being trained; asynchronous: a copy, refreshed after each step
        served = copy.deepcopy(peft_model).eval().requires_grad_(False) if asynchronous else peft_model
        return HFPolicy(served, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch=recipe.rollout.max_batch,
                        num_threads=recipe.rollout.generation_threads or None), None
    server, url = None, [pcfg.url]
    if pcfg.launch and accelerator.is_main_process:
        output = Path(recipe.train.output_dir)
        server = VLLMServer(base, python=pcfg.python, port=pcfg.port, max_lora_rank=recipe.lora.r,
                            max_loras=pcfg.max_loras, dtype=pcfg.dtype, log_path=output / "vllm_server.log",
                            extra_args=pcfg.server_args, startup_timeout=pcfg.startup_timeout)
        print(f"starting vLLM for {base}: {' '.join(server.command())}", flush=True)
        url = [server.start().url]
    if pcfg.launch:
        broadcast_object_list(url)  # the other processes sample from the main process's server
    # asynchronous: requests still in flight name the previous version while the next one loads
    policy = VLLMPolicy(url[0], tokenizer.eos_token_id, timeout=pcfg.request_timeout,
                        keep_versions=2 if asynchronous else 1)
    return policy, server


def sync_policy(policy, peft_model, accelerator: Accelerator, output: Path, version: int,
                run: Callable[[Any], Any] = asyncio.run) -> float:
    """Make adapter ``version`` (the weights just trained) the one rollouts sample from; returns seconds.

    An hf policy that shares the trained module only moves its version; one serving a copy (asynchronous
    training) gets the trainable weights copied in. For vLLM the main process saves the adapter and the
    server loads it under a versioned name; every process then samples with that name. ``run`` runs the
    policy's coroutines (on the rollout engine's loop during training).
    """
    start = time.perf_counter()
    if getattr(policy, "model", peft_model) is not peft_model:  # an in-process copy (asynchronous training)
        policy.set_weights({n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}, version)
        return time.perf_counter() - start
    if not isinstance(policy, VLLMPolicy):  # in process: the policy serves the module being trained
        run(policy.load_adapter(None, version))
        return time.perf_counter() - start
    if accelerator.is_main_process:
        path = output / "adapters" / f"v{version}"
        peft_model.save_pretrained(path)
        run(policy.load_adapter(str(path), version))
        stale = output / "adapters" / f"v{version - policy.keep_versions}"
        if stale.exists():  # unloaded from the server by load_adapter; the checkpoints keep their own copy
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    policy.version = version
    return time.perf_counter() - start


def evaluate_policy(policy, chat: ChatFormat, suite: EnvSuite, recipe: Recipe, accelerator: Accelerator,
                    run: Callable[[Any], Any] = asyncio.run) -> dict[str, Any]:
    """Held-out success on each environment's test split, split across processes."""
    tasks = eval_tasks(suite.prototypes, recipe.eval.limit)
    mine = tasks[accelerator.process_index::accelerator.num_processes]
    sampling = SamplingParams(max_new_tokens=recipe.rollout.max_new_tokens, temperature=recipe.eval.temperature)
    limits = EpisodeLimits(recipe.rollout.max_turns, recipe.rollout.max_total_tokens)
    trajs = run(run_episodes(policy, suite.make, mine, list(range(len(mine))), chat, sampling, limits))
    return summarize(gather_object([t.summary() for t in trajs]))


def prepare_model(recipe: Recipe, suite: EnvSuite, accelerator: Accelerator):
    """Base model (built if missing) → SFT warm start (if enabled) → fresh LoRA adapter.

    The warm start plays the oracle on ``envs`` and on ``sft.extra_envs``; a built tokenizer learns from both
    (also with SFT off, so that the recipe names one tiny model either way).
    """
    output = Path(recipe.train.output_dir)
    sft_envs = [*recipe.envs, *recipe.sft.extra_envs]
    with accelerator.main_process_first():
        base = ensure_base_model(recipe.model, sorted({env.name for env in sft_envs}))
    start = base
    if recipe.sft.enabled:
        start = run_sft(base, output / "sft", add_envs(suite, recipe.sft.extra_envs), recipe.sft, recipe.train.seed)
    model, tokenizer = load_model(start)
    return add_lora(model, recipe.lora), tokenizer, start


def train(recipe: Recipe) -> dict[str, Any]:
    """Run the recipe; return the final evaluation results (empty when ``eval.at_end`` is off)."""
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg, rcfg = recipe.train, recipe.rollout
    if rcfg.tasks_per_step % world:
        raise ValueError(f"rollout.tasks_per_step={rcfg.tasks_per_step} must divide by {world} processes")
    check_policy_setup(recipe)  # before SFT, which can take minutes
    set_seed(cfg.seed)
    suite = build_envs(recipe)
    model, tokenizer, start = prepare_model(recipe, suite, accelerator)
    set_seed(cfg.seed + rank)  # processes sample different completions; the task sampler is shared
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.algo.lr, weight_decay=recipe.algo.weight_decay)
    warmup = max(recipe.algo.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model, optimizer = accelerator.prepare(model, optimizer)
    peft_model = accelerator.unwrap_model(model)
    policy, server = make_policy(recipe, peft_model, tokenizer, start, accelerator)
    try:
        return _train(recipe, accelerator, suite, model, peft_model, tokenizer, start, optimizer, scheduler, policy)
    finally:
        if server is not None:
            server.stop()


def _train(recipe: Recipe, accelerator: Accelerator, suite: EnvSuite, model, peft_model, tokenizer, start: Path,
           optimizer, scheduler, policy) -> dict[str, Any]:
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg, rcfg = recipe.train, recipe.rollout
    output = Path(cfg.output_dir)
    chat = ChatFormat(tokenizer)
    sampler = TaskSampler({n: (lambda i, e=e: e.task_at("train", i)) for n, e in suite.prototypes.items()},
                          {n: e.split_sizes["train"] for n, e in suite.prototypes.items()},
                          suite.weights, seed=cfg.seed, informative_floor=rcfg.informative_floor,
                          informative_momentum=rcfg.informative_momentum)
    task_stats = TaskAdvantageStats(recipe.algo.task_norm_momentum) if recipe.algo.task_norm else None
    first_step = 0
    checkpoint = resolve_resume(cfg.resume, output)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, peft_model, rank)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if task_stats is not None:
            task_stats.load_state_dict(state["task_stats"])
        first_step = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {first_step}")
    planner = StepPlanner(sampler, rcfg.tasks_per_step, rank, world)
    engine = RolloutEngine(policy, suite.make, planner, lambda trajs: score(trajs, suite), chat,
                           SamplingParams(max_new_tokens=rcfg.max_new_tokens, temperature=rcfg.temperature),
                           EpisodeLimits(rcfg.max_turns, rcfg.max_total_tokens), rcfg.group_size,
                           rcfg.max_staleness, rcfg.max_inflight, first_step).start()
    try:
        return _steps(recipe, accelerator, suite, model, peft_model, tokenizer, start, optimizer, scheduler, policy,
                      engine, planner, task_stats, first_step, chat)
    finally:
        engine.close()


def _steps(recipe: Recipe, accelerator: Accelerator, suite: EnvSuite, model, peft_model, tokenizer, start: Path,
           optimizer, scheduler, policy, engine: RolloutEngine, planner: StepPlanner,
           task_stats: TaskAdvantageStats | None, first_step: int, chat: ChatFormat) -> dict[str, Any]:
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg, rcfg = recipe.train, recipe.rollout
    output = Path(cfg.output_dir)
    asynchronous = rcfg.max_staleness > 0
    sync_policy(policy, peft_model, accelerator, output, first_step, run=engine.run)
    engine.publish(first_step)
    logger = MetricsLogger(output, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        (output / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))

    bar = tqdm(range(first_step, cfg.steps), desc="grpo", disable=not accelerator.is_main_process,
               initial=first_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        # 1. collect: this process's share of the step's groups, no more than max_staleness versions old
        batch = engine.take(rcfg.tasks_per_step // world, version=step)
        trajs = batch.trajectories  # scored by the engine as each group finished
        records = gather_object([{**t.summary(), "task": t.task.env, "scored": t.scored, "rank": rank}
                                 for t in trajs])
        errors = sum(not r["scored"] for r in records)
        if errors > rcfg.max_error_rate * len(records):
            bad = next((t.error for t in trajs if not t.scored), "")
            raise RuntimeError(f"step {step}: {errors}/{len(records)} episodes failed (env/policy errors); "
                               f"rollout.max_error_rate={rcfg.max_error_rate}. First error here: {bad}")
        # 2. advantages over the whole step (identical on every process)
        adv, informative, adv_stats = compute_advantages(
            torch.tensor([r["reward"] for r in records]), torch.tensor([r["group"] for r in records]),
            torch.tensor([r["scored"] for r in records]), [r["task"] for r in records], task_stats,
            scale_by_std=recipe.algo.scale_by_std)
        own = [i for i, r in enumerate(records) if r["rank"] == rank]
        if rcfg.informative_floor:  # before the next step's groups are drawn (asynchronous runs: the one after)
            engine.run(planner.observe(informative_groups(records, informative)))
        # 3. batch: only informative episodes carry gradient
        chosen = [(trajs[k], adv[i].item()) for k, i in enumerate(own) if informative[i]]
        sequences = collate([t for t, _ in chosen], [a for _, a in chosen], tokenizer.pad_token_id)
        # 4. update
        t1 = time.time()
        model.train()
        update_stats = policy_update(model, peft_model, optimizer, scheduler, accelerator, sequences,
                                     recipe.algo, rcfg.temperature, tokenizer.pad_token_id)
        # 5. sync: the new adapter version is what the next groups sample from
        t_sync = sync_policy(policy, peft_model, accelerator, output, step + 1, run=engine.run)
        more = step + 1 < cfg.steps  # after the last step nothing new is admitted
        if asynchronous and more:  # admit the next groups now; synchronous runs wait until the step is saved
            engine.publish(step + 1)
        weights = {f"sampler/{name}/weight": w for name, w in planner.sampler.current_weights().items()} \
            if rcfg.informative_floor else {}
        metrics = {**rollout_metrics(records), **adv_stats, **weights, **update_stats,
                   **staleness_metrics(batch, accelerator), "time/sync": t_sync, "time/rollout": t1 - t0,
                   "time/update": time.time() - t1, "time/step": time.time() - t0}
        # 6. save / eval / log
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            metrics["sync/param_gap"] = gap = param_sync_gap(model, accelerator)
            if gap > 1e-6:
                raise RuntimeError(f"step {step + 1}: processes hold different adapters (gap {gap:.3g})")
            state = {"step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "sampler": engine.run(planner.state_before(engine.resume_step())),
                     "task_stats": task_stats.state_dict() if task_stats is not None else None,
                     "base_model": str(start)}
            save_checkpoint(output / "checkpoints" / f"step_{step + 1}", peft_model, state, rank,
                            accelerator.is_main_process)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            results = evaluate_policy(policy, chat, suite, recipe, accelerator, run=engine.run)
            metrics.update({f"eval/{n}/success": r["success"] for n, r in results["tasks"].items()})
        if (step + 1) % cfg.log_every == 0:
            logger.log(step + 1, metrics)
        bar.set_postfix({k.split("/")[1][:5]: f"{v:.2f}" for k, v in metrics.items()
                         if k.startswith("rollout/") and k.endswith("/success")})
        if not asynchronous and more:
            engine.publish(step + 1)
    engine.stop()  # groups admitted for steps beyond the last (asynchronous runs) are not needed
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        peft_model.save_pretrained(output / "adapter")
    results = {}
    if recipe.eval.at_end:
        results = evaluate_policy(policy, chat, suite, recipe, accelerator, run=engine.run)
        logger.log(cfg.steps, {f"eval/{n}/success": r["success"] for n, r in results["tasks"].items()})
    logger.close()
    return results


def staleness_metrics(batch, accelerator: Accelerator) -> dict[str, float]:
    """How old the step's samples were, and how many groups were dropped as too old (all processes)."""
    mine = torch.tensor([float(sum(batch.staleness)), float(max(batch.staleness, default=0)),
                         float(len(batch.staleness)), float(batch.dropped)], dtype=torch.float64)
    rows = accelerator.gather(mine.to(accelerator.device).unsqueeze(0)).view(-1, 4).cpu()
    return {"rollout/staleness_mean": rows[:, 0].sum().item() / max(rows[:, 2].sum().item(), 1.0),
            "rollout/staleness_max": rows[:, 1].max().item(), "rollout/stale_dropped": rows[:, 3].sum().item(),
            "time/wait": batch.waited}
