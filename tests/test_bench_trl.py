"""bench/trl_compare.py's trl adapter: trl sees the agentrl environment's tools, prompts, observations and rewards.

No training here: these check the mapping the benchmark's fairness rests on, in a second or two.
"""

from __future__ import annotations

import inspect

import pytest

from agentrl.envs import make_env
from agentrl.rollout.chat import ChatFormat
from bench.trl_compare import RESERVED, dataset_rows, env_entry, trl_environment_class, trl_tool_schemas

pytest.importorskip("trl")


@pytest.fixture()
def env():
    entry = env_entry()
    return make_env(entry["name"], **entry["kwargs"])


def trl_tools(instance) -> dict:
    """The tool table trl's GRPOTrainer builds for an environment instance (its own discovery rule)."""
    methods = [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
               if name not in RESERVED and not name.startswith("_")]
    return {method.__name__: method for method in methods}


def test_trl_derives_exactly_the_agentrl_tool_schemas(env):
    cls = trl_environment_class(env.tools())
    assert trl_tool_schemas(cls) == env.tools()
    assert sorted(trl_tools(cls(env))) == sorted(spec["function"]["name"] for spec in env.tools())


def test_trl_renders_the_same_prompt_and_observation_tokens(env, tokenizer):
    from trl import GRPOTrainer

    cls = trl_environment_class(env.tools())
    instance = cls(env)
    task = env.task_at("train", 3)
    opening = env.reset(task)
    row = dataset_rows([task], opening)[0]
    # trl appends reset()'s string to the row's last (empty) user message, then renders with the bound methods
    question = instance.reset(**row)
    prompt = row["prompt"][:-1] + [{**row["prompt"][-1], "content": row["prompt"][-1]["content"] + question}]
    assert prompt == opening
    chat = ChatFormat(tokenizer)
    trl_ids = tokenizer.apply_chat_template(prompt, tools=list(trl_tools(instance).values()),
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
    assert trl_ids == chat.prompt_ids(opening, env.tools())
    # tool results: trl's suffix ids (its private helper, on a stand-in trainer) against agentrl's observation ids
    stub = type("Stub", (), dict(processing_class=tokenizer, chat_template=None, _is_vlm=False,
                                 chat_template_kwargs={}, _tokenizer=tokenizer))()
    tool_messages = [{"role": "tool", "name": "calculate", "content": "42"}]
    assert GRPOTrainer._get_tool_suffix_ids(stub, tool_messages) == chat.observation_ids(tool_messages)


def test_adapter_steps_the_environment_and_reports_its_reward(env):
    cls = trl_environment_class(env.tools())
    instance = cls(make_env(env.name, **{"min_operand": env.min_operand, "max_operand": env.max_operand,
                                         "ops": env.ops, "phrasing": env.phrasing}))
    task = env.task_at("train", 7)
    tools = trl_tools(instance)

    assert instance.reset(task_index=task.index, prompt=[]) == task.prompt
    assert instance.get_reward() == 0.0  # not finished yet
    assert tools["calculate"](expression=task.data["expression"]) == str(task.data["answer"])
    assert tools["calculate"](expression="1 +").startswith("Error: ")  # the environment's own error observation
    assert tools["calculate"](wrong=1).startswith("Error: ")  # bad arguments: checked by env.step as in agentrl
    assert tools["answer"](value=task.data["answer"]) == "Answer recorded."
    assert instance.get_reward() == 1.0
    assert tools["answer"](value=-1).startswith("Error: ")  # after the end: an error, the reward stays
    assert instance.get_reward() == 1.0

    instance.reset(task_index=task.index)  # trl reuses instances across batches
    assert instance.get_reward() == 0.0
    tools["answer"](value=task.data["answer"] + 1)
    assert instance.get_reward() == 0.0 and instance.done


def test_reserved_tool_names_are_refused():
    spec = {"type": "function", "function": {"name": "reset", "description": "x",
                                             "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(ValueError, match="reset"):
        trl_environment_class([spec])


def _run(seconds_per_step: float, other_cores: float, steps: int = 4) -> dict:
    return {"steps": [{"step": i + 1, "time": seconds_per_step, "rollout_time": seconds_per_step / 2,
                       "trajectories": 64, "reward": 0.5} for i in range(steps)],
            "process_wall_s": seconds_per_step * steps + 10, "other_processes_cores": other_cores}


def test_report_leaves_disturbed_runs_out_of_the_medians():
    from bench.trl_compare import report

    results = {"runs": {"agentrl": [_run(8.0, 0.01), _run(20.0, 0.9), _run(10.0, 0.02)],
                        "trl": [_run(16.0, 0.0), _run(80.0, 1.0), _run(16.0, 0.5)]}}
    text = report(results, last=2, max_other=0.1)
    assert "20.0" not in text and "(0.90)*" in text and "(0.50)*" in text
    assert results["summary"]["agentrl"]["trajectories_per_s"] == pytest.approx((8.0 + 6.4) / 2)  # 64/8, 64/10
    assert results["summary"]["trl"]["trajectories_per_s"] == pytest.approx(4.0)
    assert results["summary"]["ratio_trajectories_per_s"] == pytest.approx(7.2 / 4.0)
    assert "WARNING" not in text

    all_bad = {"runs": {"agentrl": [_run(8.0, 0.5)], "trl": [_run(16.0, 0.5)]}}
    assert "WARNING: every agentrl run was disturbed" in report(all_bad, last=2, max_other=0.1)
    assert all_bad["summary"]["ratio_trajectories_per_s"] == pytest.approx(2.0)
