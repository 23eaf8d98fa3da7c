"""The locally built tiny model and tokenizer: template trl recognises, special tokens, vLLM-servable shape."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from agentrl.model import SHAPES, TOOL_TOKENS, qwen25_chat_template
from agentrl.rollout.chat import ChatFormat


def test_chat_template_is_trls_qwen25(tokenizer):
    from trl.chat_template_utils import get_training_chat_template

    assert tokenizer.chat_template == qwen25_chat_template()
    assert "generation" in get_training_chat_template(tokenizer)  # trl knows it: assistant-only loss works


def test_special_tokens_are_single_ids(tokenizer):
    for token in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *TOOL_TOKENS]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_numbers_up_to_999_are_single_tokens_and_text_round_trips(tokenizer):
    # loaded through AutoTokenizer, as training and serving load it (Qwen2Tokenizer replaces the pre-tokenizer)
    assert all(len(tokenizer(str(n), add_special_tokens=False)["input_ids"]) == 1 for n in range(1000))
    ids = tokenizer("Ann has 1234567 apples", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids][-4:] == ["123", "456", "7", " apples"]
    text = '<tool_call>\n{"name": "get", "arguments": {"key": "k7q"}}\n</tool_call>'
    assert ChatFormat(tokenizer).decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_default_shape_is_servable_by_vllm_cpu():
    tiny = SHAPES["tiny"]
    assert tiny.hidden // tiny.heads >= 32  # vLLM's CPU attention rejects head_dim 16
    assert 0 < tiny.window_layers < tiny.layers


def test_built_model_loads_and_matches_tokenizer(micro_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    config = json.loads((micro_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2"


def test_a_model_built_by_an_older_agentrl_is_refused_not_reused(micro_model_dir, tmp_path):
    import shutil

    from agentrl.config import ModelConfig
    from agentrl.model import BUILD_STAMP
    from agentrl.train.setup import ensure_base_model

    assert ensure_base_model(ModelConfig(path=str(micro_model_dir), build="micro")) == micro_model_dir
    old = tmp_path / "old"
    shutil.copytree(micro_model_dir, old)
    (old / BUILD_STAMP).unlink()  # what format 1 left behind
    # no stamp: format 1, or a checkpoint no tiny-model build wrote (SFT's output is the common case)
    with pytest.raises(RuntimeError, match="older agentrl.*format 1.*SFT output.*model.build: null"):
        ensure_base_model(ModelConfig(path=str(old), build="tiny"))
    (old / BUILD_STAMP).write_text(json.dumps({"format": 99}))
    with pytest.raises(RuntimeError, match="older agentrl.*format 99"):
        ensure_base_model(ModelConfig(path=str(old), build="tiny"))
    assert ensure_base_model(ModelConfig(path=str(old), build=None)) == old  # a user's own model: used as is


def _span(ids: list[int], text: str, tokenizer) -> list[int]:
    """The shortest run of ``ids`` that decodes to ``text`` (surrounding spaces ignored)."""
    runs = [ids[i:j] for i in range(len(ids)) for j in range(i + 1, len(ids) + 1)
            if tokenizer.decode(ids[i:j]).strip() == text]
    assert runs, f"{text!r} not in {[tokenizer.decode([i]) for i in ids]}"
    return min(runs, key=len)


def _contains(ids: list[int], run: list[int]) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


@pytest.mark.parametrize("name, kwargs, value", [
    ("lookup", {}, lambda call: call.arguments["key"]),
    ("lookup", {"alphabet": "words", "key_length": [1, 1]}, lambda call: call.arguments["key"]),
    ("calculator", {"phrasing": "plain", "min_operand": 10, "max_operand": 99},
     lambda call: call.arguments["expression"]),
])
def test_first_call_copies_the_same_token_ids_the_prompt_shows(tokenizer, name, kwargs, value):
    # A from-scratch model copies a value from the prompt into its first call. If the prompt tokenizes it
    # differently (" pear" after a space against "pear" after a quote), the model must first learn that
    # mapping for every value: lookup-v1 did, and its copying arrived 100-150 SFT steps later (docs/learning.md).
    from agentrl.envs import make_env
    from agentrl.policy.scripted import tool_call_text

    env, chat = make_env(name, **kwargs), ChatFormat(tokenizer)
    for task in env.tasks("test", 5):
        prompt = chat.prompt_ids(env.reset(task), env.tools())
        call = env.oracle(task)[0]
        copied = _span(chat.encode(tool_call_text(call)), str(value(call)), tokenizer)
        assert _contains(prompt, copied), (task.prompt, [tokenizer.decode([i]) for i in copied])


def test_a_built_tokenizer_learns_from_the_recipes_environments(tmp_path):
    from agentrl.config import ModelConfig
    from agentrl.model import BUILD_STAMP
    from agentrl.train.setup import ensure_base_model

    built = ensure_base_model(ModelConfig(path=str(tmp_path / "a"), build="micro"), ["lookup"])
    assert json.loads((built / BUILD_STAMP).read_text())["tokenizer_envs"] == ["lookup"]
    chosen = ensure_base_model(ModelConfig(path=str(tmp_path / "b"), build="micro", tokenizer_envs=["calculator"]),
                               ["lookup"])
    assert json.loads((chosen / BUILD_STAMP).read_text())["tokenizer_envs"] == ["calculator"]
    assert ensure_base_model(ModelConfig(path=str(built), build="micro"), ["lookup"]) == built  # reused
    with pytest.raises(RuntimeError, match=r"tokenizer_envs \['lookup'\] \(this recipe builds \['calculator', 'lookup'\]\)"):
        ensure_base_model(ModelConfig(path=str(built), build="micro"), ["calculator", "lookup"])
    with pytest.raises(RuntimeError, match="size 'micro'.*'tiny'"):
        ensure_base_model(ModelConfig(path=str(built), build="tiny"), ["lookup"])
    stamp = json.loads((built / BUILD_STAMP).read_text())
    del stamp["tokenizer_envs"]  # an early format-2 build did not record them
    (built / BUILD_STAMP).write_text(json.dumps(stamp))
    with pytest.raises(RuntimeError, match="tokenizer_envs None"):
        ensure_base_model(ModelConfig(path=str(built), build="micro"), ["lookup"])
