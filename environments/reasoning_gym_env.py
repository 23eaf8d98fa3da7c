"""Reasoning Gym: any `reasoning-gym` generator as single-answer tasks, scored by the dataset's own verifier.

The package's datasets are seeded procedural generators: ``create_dataset(name, seed=s, size=n)[i]`` is one
question with its reference answer, and ``score_answer(answer, entry)`` is the verifier (1.0 = correct). The
model answers through ``answer(text)``; optionally it may compute first with ``calculate`` or ``python``. The
oracle answers with the dataset's reference answer (after calculating the generator's own expression, where it
has one and the calculator is offered).

How train and test stay apart (two guarantees, so it holds for every generator):

* Seeds. Each dataset has a test stream and a train stream of item positions. Position ``p`` of a stream is
  item ``p % BLOCK`` of ``create_dataset(name, seed=stream_seed + p - p % BLOCK, size=BLOCK)``, which for the
  generators that draw item ``i`` from ``Random(seed + i)`` (nearly all) is the item seeded ``stream_seed + p``.
  The test stream starts at ``base`` and may use at most ``TEST_POSITIONS`` positions; the train stream starts
  at ``base + TEST_POSITIONS``: the two streams never share a seed.
* Content. A question is a test question when the sha256 of its text falls in one bucket of ten. The test split
  takes only test questions and the train split never does, so no prompt is in both even where different seeds
  give the same question (small configs, or generators that seed otherwise).

Test task k of a dataset is the k-th test question of its test stream (scanned in order, the scan kept for the
process); train task i is the first train question at positions ``i * TRAIN_STRIDE ..`` of its train stream
(random access).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import OrderedDict
from importlib.metadata import version as package_version
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from agentrl.envs.base import ToolEnvironment, task_rng, tool
from agentrl.envs.schema import function_schema
from agentrl.envs.tools import Tool
from agentrl.types import Message, Task, ToolCall
from environments.calculator import calculate

RG_VERSION = package_version("reasoning-gym")
BLOCK = 1024  # items per generator instance: some generators build all ``size`` items up front (acre)
TEST_POSITIONS = 1 << 20  # the test stream's seed range; the train stream starts after it
TRAIN_STRIDE = 16  # positions tried per train task (9 in 10 questions are train questions)
CACHED_INSTANCES = 16
CACHED_ENTRIES = 4096
MAX_ANSWER_CHARS = 20_000  # a longer answer scores 0 unscored: some verifiers overflow on huge numbers
# Measured (docs/envs/reasoning_gym.md): their questions or reference answers depend on Python's salted hash()
# (set order), so another process with another PYTHONHASHSEED (the env server, a data worker) makes other tasks.
HASH_DEPENDENT = ("codeio", "intermediate_integration", "isomorphic_strings", "knight_swap", "list_functions",
                  "polynomial_multiplication", "ransom_note", "word_ladder")
PYTHON_SECONDS = 10


# Generators, their items and the test streams' scans, shared by every environment in the process: the env
# server builds an environment per session, and rescanning a test stream (~10 questions per test task) or
# reloading a generator's word list for each session would cost more than the episode.
_LOCK = threading.Lock()  # guards the caches
_SCAN_LOCK = threading.Lock()  # one test-stream scan at a time (it takes _LOCK through _cached)
_GENERATORS: OrderedDict[tuple[str, str, int], Any] = OrderedDict()  # (name, config, seed) -> dataset
_ENTRIES: OrderedDict[tuple[str, str, int], dict[str, Any]] = OrderedDict()  # (name, config, item seed) -> item
_SCANS: dict[tuple[str, str, int], tuple[list[int], list[int]]] = {}  # test stream -> (test positions, [next])


def _cached(cache: OrderedDict, key: tuple, limit: int, make: Any) -> Any:
    """``cache[key]``, made by ``make()`` outside the lock when missing (two threads may both make it: harmless)."""
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()
    with _LOCK:
        cache[key] = value
        if len(cache) > limit:
            cache.popitem(last=False)
    return value


def in_test_split(question: str) -> bool:
    """Stable split membership of a question (sha256: Python's hash() is salted per process)."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10 == 0


def _specs(datasets: str | list[str] | dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``"a"``, ``["a", "b"]`` or ``{"a": {config}, ...}`` as ``{name: config}``."""
    if isinstance(datasets, str):
        datasets = [datasets]
    specs = {name: {} for name in datasets} if isinstance(datasets, (list, tuple)) else dict(datasets)
    if not specs:
        raise ValueError("datasets must name at least one reasoning-gym dataset")
    for name, config in specs.items():
        if name not in DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {name!r}; reasoning-gym {RG_VERSION} has "
                             f"{len(DATASETS)}: {', '.join(sorted(DATASETS))}")
        if name in HASH_DEPENDENT:
            raise ValueError(f"{name}'s questions or answers change with PYTHONHASHSEED, so another process "
                             "would build other tasks; it cannot be served reproducibly")
        if not isinstance(config, dict) or {"seed", "size"} & set(config):
            raise ValueError(f"{name}: config must be a dict without seed or size (the adapter sets both)")
        checked = DATASETS[name][1](**config, seed=0, size=1)  # a bad config fails here, by name
        if hasattr(checked, "validate"):
            checked.validate()
    return specs


class ReasoningGymEnv(ToolEnvironment):
    """Questions from reasoning-gym datasets; ``answer`` is scored by the dataset's ``score_answer``.

    Args:
        datasets: a dataset name, a list of names, or ``{name: config}`` where config is the dataset's
            config fields (e.g. ``{"leg_counting": {"max_animals": 1}}``); never ``seed`` or ``size``.
        weights: how often each dataset is drawn, in the order of ``datasets`` (default: equally).
        calculator: also offer ``calculate(expression)`` (exact ``+ - * /``, as in the calculator env).
        python: also offer ``python(code)``, run in agentrl's process sandbox (needs root, Linux >= 5.12).
    """

    name = "reasoning_gym"
    version = "reasoning_gym-v1"
    system_prompt = "Solve the problem, then call answer with only the final answer."

    def __init__(self, datasets: str | list[str] | dict[str, dict[str, Any]] = "basic_arithmetic",
                 weights: list[float] | None = None, calculator: bool = False, python: bool = False) -> None:
        self.specs = _specs(datasets)
        self.names = list(self.specs)
        self.weights = [1.0] * len(self.names) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.names) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be {len(self.names)} non-negative numbers, not all 0, got {weights}")
        extra = [Tool(function_schema(calculate, "calculate"), calculate)] if calculator else []
        extra += [Tool(function_schema(self.python, "python"), self.python)] if python else []
        super().__init__(tools=extra)
        self.calculator = calculator
        # The package version is always named: the same seed gives other questions in other releases.
        shown = json.dumps(self.specs, sort_keys=True, separators=(",", ":"))
        if weights is not None:
            shown += f",weights={self.weights}"
        self.task_version = f"{self.version}(reasoning-gym={RG_VERSION},datasets={shown})"
        self.base = {name: int(hashlib.sha256(f"{self.version}/{name}".encode()).hexdigest(), 16) % (1 << 31)
                     for name in self.names}
        self._configs = {name: json.dumps(config, sort_keys=True) for name, config in self.specs.items()}
        self._sandbox = None

    # --- items --------------------------------------------------------------------------------
    def _start(self, name: str, split: str) -> int:
        """The first seed of a dataset's stream for a split."""
        return self.base[name] + (0 if split == "test" else TEST_POSITIONS)

    def _instance(self, name: str, split: str, block: int) -> Any:
        seed = self._start(name, split) + block * BLOCK
        return _cached(_GENERATORS, (name, self._configs[name], seed), CACHED_INSTANCES,
                       lambda: reasoning_gym.create_dataset(name, seed=seed, size=BLOCK, **self.specs[name]))

    def _entry(self, name: str, split: str, position: int) -> dict[str, Any]:
        """The generator's item at a stream position (its question, answer and metadata, as generated)."""
        if not 0 <= position < (TEST_POSITIONS if split == "test" else self.split_sizes[split] * TRAIN_STRIDE):
            raise ValueError(f"{name}: position {position} is outside the {split} stream")
        block, offset = divmod(position, BLOCK)
        return _cached(_ENTRIES, (name, self._configs[name], self._start(name, split) + position), CACHED_ENTRIES,
                       lambda: self._instance(name, split, block)[offset])

    def _usable(self, name: str, split: str, position: int, test: bool) -> bool:
        """Whether the item at a position is a question of the wanted split. A generator that raises at a
        position (basic_arithmetic divides by zero at some seeds) has no item there: the position is skipped."""
        try:
            question = self._entry(name, split, position)["question"]
        except Exception:  # noqa: BLE001 - any generator bug; the skip is as deterministic as the bug
            return False
        return in_test_split(question) == test

    def _dataset_of(self, split: str, index: int) -> str:
        return task_rng(self.task_version, "dataset", split, index).choices(self.names, self.weights)[0]

    def _test_position(self, name: str, k: int) -> int:
        """Position of the k-th test question in ``name``'s test stream (the scan is shared and kept)."""
        with _SCAN_LOCK:
            found, scanned = _SCANS.setdefault((name, self._configs[name], self._start(name, "test")), ([], [0]))
        while len(found) <= k:
            with _SCAN_LOCK:  # another thread may have scanned past k meanwhile
                if len(found) > k:
                    break
                position = scanned[0]
                if position >= TEST_POSITIONS:
                    raise ValueError(f"{self.task_version}: too few distinct {name} questions for the test split")
                if self._usable(name, "test", position, test=True):
                    found.append(position)
                scanned[0] = position + 1
        return found[k]

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        if not 0 <= index < self.split_sizes[split]:
            raise ValueError(f"{self.name}: the {split} split has {self.split_sizes[split]} tasks, not index {index}")
        name = self._dataset_of(split, index)
        if split == "test":
            # the k-th test task of this dataset, k counting earlier test indices that drew it
            k = sum(self._dataset_of(split, j) == name for j in range(index)) if len(self.names) > 1 else index
            position = self._test_position(name, k)
        else:
            tries = range(index * TRAIN_STRIDE, (index + 1) * TRAIN_STRIDE)
            position = next((p for p in tries if self._usable(name, split, p, test=False)), None)
            if position is None:
                raise ValueError(f"{self.task_version}: too few distinct {name} questions for the {split} split")
        entry = self._entry(name, split, position)
        answer = entry["answer"]
        data = {"dataset": name, "position": position, "answer": None if answer is None else str(answer)}
        expression = entry["metadata"].get("expression")
        if isinstance(expression, str):  # arithmetic datasets: what the oracle computes before it answers
            data["expression"] = expression
        return Task(env=self.name, split=split, index=index, prompt=entry["question"], data=data,
                    version=self.task_version)

    def oracle(self, task: Task) -> list[ToolCall]:
        if task.data["answer"] is None:
            raise ValueError(f"{task.data['dataset']} has no reference answer (its verifier checks a solution's "
                             "validity), so there is no oracle for it")
        compute = [ToolCall("calculate", {"expression": task.data["expression"]})] \
            if self.calculator and "expression" in task.data else []
        return [*compute, ToolCall("answer", {"text": task.data["answer"]})]

    # --- episode ------------------------------------------------------------------------------
    def reset(self, task: Task) -> list[Message]:
        self._close_sandbox()
        return super().reset(task)

    @tool
    def answer(self, text: str) -> str:
        """Submit your final answer; ends the episode.

        Args:
            text: the answer only, in the form the question asks for.
        """
        name, split = self.task.data["dataset"], self.task.split
        entry = self._entry(name, split, self.task.data["position"])
        if entry["question"] != self.task.prompt:
            raise RuntimeError(f"{name} regenerated another question for {self.task.id}: not deterministic")
        if len(text) > MAX_ANSWER_CHARS:
            self.info["verifier_error"] = f"answer longer than {MAX_ANSWER_CHARS} characters, not scored"
            score = 0.0
        else:
            verifier = self._instance(name, split, self.task.data["position"] // BLOCK)
            try:
                score = float(verifier.score_answer(text, entry))
            # Some verifiers raise on text they cannot parse (prime_factorization on "abc"): that is a wrong
            # answer, not a broken reward, so it scores 0 and the reason is kept in the episode's info.
            except Exception as exc:  # noqa: BLE001
                self.info["verifier_error"] = f"{type(exc).__name__}: {exc}"[:500]
                score = 0.0
        if not 0.0 <= score <= 1.0:
            raise RuntimeError(f"{name}'s verifier scored {score}, outside [0, 1]")
        self.info["score"] = score
        self.finish(reward=score, success=score == 1.0)
        return "Answer recorded."

    def python(self, code: str) -> str:
        """Run a Python 3 program in a sandbox and see what it prints (no network, a few seconds).

        Args:
            code: the program; print what you want to see.
        """
        from agentrl.sandbox import Sandbox, SandboxLimits

        # One sandbox per episode, made on first use (~0.25 s); SandboxUnavailable propagates: an env that
        # was asked for python on a machine that cannot sandbox must fail loudly, not train without it.
        if self._sandbox is None:
            limits = SandboxLimits(cpu_seconds=PYTHON_SECONDS, wall_seconds=float(PYTHON_SECONDS),
                                   max_output_bytes=16 << 10)
            self._sandbox = Sandbox(limits)
        result = self._sandbox.run(["python3", "-c", code])
        killed = f"[killed: {result.killed_reason or 'timeout'}]\n" if result.timed_out or result.killed_reason else ""
        output = killed + result.stdout + result.stderr  # the base cuts it to max_observation_chars
        return output if output.strip() else f"(no output; exit code {result.exit_code})"

    def _close_sandbox(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def close(self) -> None:
        self._close_sandbox()
