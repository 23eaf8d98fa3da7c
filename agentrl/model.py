"""Build a tiny Qwen2 causal LM and a byte-level BPE tokenizer locally, in seconds, with no network.

The tokenizer carries the Qwen2.5 tool-calling chat template, read from the installed ``trl`` package so
trl recognises it (its SFT training template and tool-call parser key on the exact text).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS, BOS = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Qwen2's pre-tokenizer pattern (transformers' Qwen2Tokenizer re-applies it on load whatever tokenizer.json says):
# it splits digits apart. The tokenizer then adds every integer 0-999 as a token of its own (see NUMBER_TOKENS).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    window_layers: int = 0  # the bottom `window_layers` layers use sliding-window attention
    window: int = 64


# "tiny" is the smallest shape vLLM's CPU backend serves (head_dim 32); "micro" (head_dim 16) is for unit tests.
# Why sliding-window layers: a from-scratch model must learn to copy keys and numbers from the last tool result
# into its next call. With full attention over a ~300-token prompt, the attention gradient toward the source is
# diluted and copying had not emerged after 600 SFT steps; with two 64-token windowed layers (Qwen2's own
# sliding-window attention) an SFT loop reached 100% teacher-forced accuracy on lookup in ~450 steps
# (docs/learning.md).
SHAPES = {
    "micro": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "tiny": ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, window_layers=2),
    "small": ModelShape(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768, window_layers=3),
}


def qwen25_chat_template() -> str:
    """The Qwen2.5 tool-calling template text as shipped by trl."""
    return resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text(encoding="utf-8")


def generic_corpus(n: int, seed: int = 0) -> Iterable[str]:
    """Filler text with words, numbers and JSON so the BPE has a general alphabet of merges."""
    rng = random.Random(seed)
    words = ("the a key value answer tool call result number start chain follow hops apples books has buys "
             "gives more left how many what is total each error unknown argument expression calculate get "
             "function name arguments type object string integer required description properties").split()
    # the lookup task's word keys: its corpus below is rendered with default (alphanumeric) keys
    from environments.lookup import KEY_WORDS

    words = words + list(KEY_WORDS)
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        payload = {"name": rng.choice(words), "arguments": {rng.choice(words): rng.randint(0, 99999)}}
        yield f"{sentence.capitalize()} {rng.randint(0, 10**6)}. {json.dumps(payload)}\n"


# Copying a one-token value from the context emerges within a few hundred SFT steps in the tiny model; copying a
# multi-token value needs induction heads, which had not formed after 600 steps (docs/learning.md). So integers
# 0-999 are added tokens: matched before pre-tokenization, longest first ("1234" -> "123", "4").
NUMBER_TOKENS = [str(n) for n in range(1000)]
# Bumped whenever a built model changes for the same arguments (2: numbers 0-999 became single tokens), so a
# directory built by an older version is not silently reused (agentrl.train.setup.ensure_base_model).
BUILD_FORMAT = 2
BUILD_STAMP = "agentrl_build.json"
BLOCKING_ENV_TRACES = 60  # oracle conversations per blocking environment in the tokenizer corpus


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a chat tokenizer with the Qwen2.5 template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS] + TOOL_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=[BOS] + TOOL_TOKENS)
    tokenizer.add_tokens(NUMBER_TOKENS)
    tokenizer.chat_template = qwen25_chat_template()
    return tokenizer


def environment_corpus(tokenizer_template: str, env_names: list[str], per_env: int) -> list[str]:
    """Rendered oracle conversations of the given environments, so merges fit the text the model will see."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from agentrl.envs import make_env
    from agentrl.rollout.traces import oracle_conversation

    texts = []
    for name in env_names:
        env = make_env(name)
        # an environment that waits on a browser or a sandbox replays fewer conversations (each costs ~0.1-1 s)
        count = min(per_env, BLOCKING_ENV_TRACES) if getattr(env, "blocking", False) else per_env
        for task in env.tasks("train", count):
            conversation = oracle_conversation(env, task)
            rendered, _ = render_jinja_template([conversation.messages], tools=conversation.tools,
                                                chat_template=tokenizer_template)
            texts.append(rendered[0])
    return texts


def build_tiny_model(output: str | Path, size: str = "tiny", env_names: list[str] | None = None,
                     vocab_size: int = 3000, seed: int = 0, max_positions: int = 2048) -> Path:
    """Write a random-init Qwen2 model and its tokenizer to ``output``.

    Args:
        output: directory to create (``from_pretrained``-loadable).
        size: one of ``SHAPES`` ("micro", "tiny", "small").
        env_names: environments whose oracle conversations join the tokenizer corpus (default: all in the
            ``environments`` table).
        vocab_size: BPE vocabulary size including special tokens.
        seed: seeds the corpus and the weight init.
        max_positions: context length.

    Example:
        >>> path = build_tiny_model("/tmp/agentrl-tiny", size="micro")  # doctest: +SKIP
    """
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SHAPES)}")
    from environments import ENVIRONMENTS

    env_names = list(ENVIRONMENTS) if env_names is None else env_names
    corpus = list(generic_corpus(2000, seed)) + environment_corpus(qwen25_chat_template(), env_names, 300)
    tokenizer = train_tokenizer(corpus, vocab_size)
    shape = SHAPES[size]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        use_sliding_window=shape.window_layers > 0, sliding_window=shape.window if shape.window_layers else None,
        layer_types=["sliding_attention" if i < shape.window_layers else "full_attention" for i in range(shape.layers)],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / BUILD_STAMP).write_text(json.dumps({"format": BUILD_FORMAT, "size": size, "seed": seed,
                                                  "tokenizer_envs": env_names}))
    return output
