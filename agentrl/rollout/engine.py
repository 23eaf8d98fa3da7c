"""RolloutEngine: GRPO groups in flight on a background event loop while the trainer trains.

The trainer owns the weights and publishes a version after each optimizer step; the engine samples with
whatever version is live and hands finished, scored groups back through a queue. Staleness is bounded by
admission: the groups meant for step ``t`` start only once version ``t - max_staleness`` is live, so with
``max_staleness = 0`` nothing is sampled while the trainer updates (synchronous on-policy training) and with
``k >= 1`` the next ``k`` steps' groups are generated during the update. A group that still ends up more than
``k`` versions behind when the trainer takes it (groups finish out of order) is dropped and counted.

Every turn's attested version must lie between the version live when its group started and the trainer's
current version; anything else means the server sampled from an adapter the trainer did not publish, which
is an error, never training data.

The engine thread runs one event loop for the whole run: the policy's HTTP client or batching worker lives
there, and the trainer submits coroutines to it (adapter loads, evaluation) with :meth:`RolloutEngine.run`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from agentrl.policy.base import Policy, SamplingParams
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episode
from agentrl.types import Task, Trajectory


class VersionMismatch(RuntimeError):
    """A sample attests an adapter version the trainer never published for it."""


@dataclass
class Group:
    """One task instance sampled ``group_size`` times (a GRPO group), scored and ready to train on."""

    step: int  # the training step it was admitted for
    group_id: int  # unique within a run: advantages are computed per group id
    start_version: int  # the version live when the group started
    trajectories: list[Trajectory] = field(default_factory=list)

    def oldest_version(self) -> int:
        """The oldest adapter version that sampled any of its tokens."""
        versions = [turn.version for t in self.trajectories for turn in t.turns]
        return min(versions, default=self.start_version)


def check_versions(trajectories: list[Trajectory], expected: int, oldest: int | None = None) -> None:
    """Every turn must come from an adapter version in ``[oldest, expected]`` (``oldest`` defaults to
    ``expected``: on-policy); raise :class:`VersionMismatch` otherwise."""
    oldest = expected if oldest is None else oldest
    for traj in trajectories:
        versions = {turn.version for turn in traj.turns}
        if any(v < oldest or v > expected for v in versions):
            wanted = f"{expected}" if oldest == expected else f"{oldest}..{expected}"
            raise VersionMismatch(f"{traj.task.id} was sampled by adapter version(s) {sorted(versions)}, "
                                  f"expected {wanted}: refusing to train on another policy's samples")


@dataclass
class Batch:
    """What :meth:`RolloutEngine.take` hands the trainer for one step."""

    groups: list[Group]
    dropped: int  # groups dropped as too stale while collecting this batch
    staleness: list[int]  # per taken group: trainer version minus its oldest sampling version
    waited: float  # seconds the trainer waited

    @property
    def trajectories(self) -> list[Trajectory]:
        return [t for g in self.groups for t in g.trajectories]


class RolloutEngine:
    """Keep GRPO groups in flight on a background thread; the trainer takes them a step at a time.

    Args:
        policy: the rollout policy; it is only ever called from the engine's loop.
        make_env: ``env name -> fresh Environment``.
        plan: ``step -> [(group_id, task)]``: this process's task instances for a step (called in order,
            once per step, from the engine thread).
        finish: called on each finished group's trajectories in the engine thread (scoring), so the
            trainer receives them ready.
        chat, sampling, limits: how episodes are played.
        group_size: episodes per task instance, started together.
        max_staleness: ``k`` above.
        max_inflight: most episodes running at once (a group starts whole, so at least ``group_size``).
        first_step: the step (and published version) training starts from.

    Example:
        >>> engine = RolloutEngine(policy, make_env, plan, score, chat, sampling, limits, 8, 1, 256)  # doctest: +SKIP
        >>> engine.start(); batch = engine.take(4, version=0)  # doctest: +SKIP
    """

    def __init__(self, policy: Policy, make_env: Callable[[str], Any], plan: Callable[[int], list[tuple[int, Task]]],
                 finish: Callable[[list[Trajectory]], None], chat: ChatFormat, sampling: SamplingParams,
                 limits: EpisodeLimits, group_size: int, max_staleness: int = 0, max_inflight: int = 256,
                 first_step: int = 0) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if max_inflight < group_size:
            raise ValueError(f"max_inflight={max_inflight} is below group_size={group_size}: a group starts whole")
        self.policy, self.make_env, self.plan, self.finish = policy, make_env, plan, finish
        self.chat, self.sampling, self.limits = chat, sampling, limits
        self.group_size, self.max_staleness, self.max_inflight = group_size, max_staleness, max_inflight
        self.version = first_step  # the newest version the trainer has published (admission starts at publish)
        self.next_step = first_step  # the step whose groups are admitted next
        self.inflight = 0  # episodes running
        self.dropped_total = 0
        self._ready: queue.Queue[Group] = queue.Queue()
        self._unfinished: dict[int, int] = {}  # step -> groups admitted and not yet taken
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-engine", daemon=True)
        self._wake: asyncio.Event | None = None
        self._producer: asyncio.Task | None = None
        self._groups: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    # --- trainer side (any thread but the engine's) ---

    def start(self) -> RolloutEngine:
        """Start the engine's loop; groups are admitted from the first :meth:`publish` on."""
        self._thread.start()
        return self

    def run(self, coro: Awaitable, timeout: float | None = None) -> Any:
        """Run ``coro`` on the engine's loop and wait for its result (adapter loads, evaluation)."""
        if not self._thread.is_alive():
            raise RuntimeError("the rollout engine is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def publish(self, version: int) -> None:
        """The trainer's weights are now version ``version`` and the policy serves it: admit more groups."""
        self.version = version
        if self._producer is None:
            self.run(self._start_producer())
        self._loop.call_soon_threadsafe(self._poke)

    def take(self, n_groups: int, version: int, poll: float = 0.5) -> Batch:
        """Block until ``n_groups`` groups no more than ``max_staleness`` versions behind ``version`` are
        ready; staler ones are dropped (counted in ``Batch.dropped``). Raises the engine's error, if any."""
        start = time.perf_counter()
        groups, staleness, dropped = [], [], 0
        while len(groups) < n_groups:
            try:
                group = self._ready.get(timeout=poll)
            except queue.Empty:
                self._raise_if_failed()
                continue
            self._taken(group.step)
            lag = version - group.oldest_version()
            for traj in group.trajectories:  # attestation: only versions published for this group
                check_versions([traj], expected=version, oldest=group.start_version)
            if lag > self.max_staleness:
                dropped += 1
                continue
            groups.append(group)
            staleness.append(lag)
        self.dropped_total += dropped
        order = sorted(range(len(groups)), key=lambda i: groups[i].group_id)  # not completion order: reproducible
        return Batch([groups[i] for i in order], dropped, [staleness[i] for i in order], time.perf_counter() - start)

    def resume_step(self) -> int:
        """The earliest step with groups not yet taken: a checkpoint resumes the task sampler there, so the
        groups in flight now are sampled again after a resume rather than lost."""
        return min((s for s, n in self._unfinished.items() if n), default=self.next_step)

    def stop(self) -> None:
        """Cancel the producer and every group in flight; the loop stays up for :meth:`run`."""
        if self._thread.is_alive():
            self.run(self._cancel_all())

    def close(self) -> None:
        """Stop everything and end the engine thread."""
        if self._thread.is_alive():
            self.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running():
            self._loop.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the rollout engine failed: {type(self._error).__name__}: {self._error}") \
                from self._error
        if not self._thread.is_alive():
            raise RuntimeError("the rollout engine thread ended")

    def _taken(self, step: int) -> None:
        self._unfinished[step] -= 1

    # --- engine side (the engine's loop) ---

    async def _start_producer(self) -> None:
        self._wake = asyncio.Event()
        self._producer = asyncio.create_task(self._produce())
        self._producer.add_done_callback(self._record_failure)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _record_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._wake.clear()
            await self._wake.wait()

    async def _produce(self) -> None:
        while True:
            step = self.next_step
            await self._wait_until(lambda: self.version >= step - self.max_staleness)
            planned = self.plan(step)
            self._unfinished[step] = len(planned)
            for group_id, task in planned:
                await self._wait_until(lambda: self.inflight + self.group_size <= self.max_inflight)
                group = Group(step=step, group_id=group_id, start_version=self.version)
                self.inflight += self.group_size
                job = asyncio.create_task(self._play(group, task))
                self._groups.add(job)
                job.add_done_callback(self._groups.discard)
                job.add_done_callback(self._record_failure)
            self.next_step = step + 1

    async def _play(self, group: Group, task: Task) -> None:
        try:
            episodes = [run_episode(self.policy, self.make_env(task.env), task, self.chat, self.sampling,
                                    self.limits, group.group_id) for _ in range(self.group_size)]
            group.trajectories = list(await asyncio.gather(*episodes))
        finally:
            self.inflight -= self.group_size
            self._poke()
        self.finish(group.trajectories)
        self._ready.put(group)

    async def _cancel_all(self) -> None:
        jobs = [self._producer, *self._groups] if self._producer is not None else list(self._groups)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
