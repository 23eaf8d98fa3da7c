"""One decode step of a Qwen2 model written out in plain tensor operations, for the in-process sampler.

Decoding the last few unfinished rows of a batch on CPU spends most of each token in Python around a small
amount of arithmetic: module calls and hooks, the attention-mask builders, the rotary table, cache
bookkeeping. ``Qwen2Step`` computes the same step, one token per row against the sampler's cache, as a short
sequence of tensor operations on the model's own weights (no copies).

It is used only when it is known to be the same computation:

- the model is a ``qwen2`` causal LM with the default rotary embedding and SiLU MLP;
- every projection is a plain ``nn.Linear``, or a LoRA layer whose update has been folded into its weight
  with the adapter disabled (``merged_lora``), so the layer computes ``base_layer(x)``;
- on first use per model it reproduced the model's own forward on a probe: two left-padded rows longer than
  the sliding window, two decode steps, logits within ``PROBE_TOLERANCE``. A model that fails the probe
  keeps the ``transformers`` forward, with a warning.
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-4  # max |logit difference| against the transformers forward, relative to max(1, |logit|)

_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> passed the probe (bool)


def _causal(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` a projection computes with: itself, or a folded LoRA layer's base layer."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else None


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen2Step:
    """``step(tokens, positions, mask, cache) -> logits``: one new token per row through a Qwen2 model.

    ``tokens`` and ``positions`` are ``(n,)`` (the token and its rotary position), ``mask`` the ``(n, L)``
    padding mask over every cache slot including the new one, ``cache`` the sampler's ``DynamicCache``,
    which is updated in place. Returns float32 logits ``(n, vocab)``.
    """

    def __init__(self, model: nn.Module) -> None:
        causal = _causal(model)
        inner = causal.model
        config = causal.config
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm
        self.head = _linear(causal.lm_head)
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = float(inner.rotary_emb.attention_scaling)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, _linear(attn.q_proj), _linear(attn.k_proj),
                                _linear(attn.v_proj), _linear(attn.o_proj), layer.post_attention_layernorm,
                                _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)))

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model has the architecture this step writes out (the probe still has to pass)."""
        causal = _causal(model)
        config = getattr(causal, "config", None)
        if config is None or getattr(config, "model_type", None) != "qwen2" or config.hidden_act != "silu":
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            return False
        inner = getattr(causal, "model", None)
        if inner is None or not hasattr(inner, "layers") or _linear(causal.lm_head) is None:
            return False
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj)
            if any(_linear(p) is None for p in projections):
                return False
        return True

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        n = tokens.shape[0]
        x = F.embedding(tokens, self.embed)  # (n, hidden)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scale).to(x.dtype)[:, None, None, :]  # (n, 1, 1, head_dim)
        sin = (angles.sin() * self.rope_scale).to(x.dtype)[:, None, None, :]
        keep = mask.bool()
        for index, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down) in enumerate(self.layers):
            h = _rms_norm(x, norm1)
            q = F.linear(h, q_proj.weight, q_proj.bias).view(n, -1, 1, self.head_dim)
            k = F.linear(h, k_proj.weight, k_proj.bias).view(n, -1, 1, self.head_dim)
            v = F.linear(h, v_proj.weight, v_proj.bias).view(n, -1, 1, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.layers[index].update(k, v)
            # A sliding layer hands back only its window; its slots are the last ones of the padding mask.
            slots = keep[:, -keys.shape[-2]:][:, None, None, :]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=slots, scale=self.scaling,
                                                 enable_gqa=q.shape[1] != keys.shape[1])
            x = x + F.linear(out.reshape(n, -1), o_proj.weight, o_proj.bias)
            h = _rms_norm(x, norm2)
            x = x + F.linear(F.silu(F.linear(h, gate.weight, gate.bias)) * F.linear(h, up.weight, up.bias),
                             down.weight, down.bias)
        x = _rms_norm(x, self.final_norm)
        return F.linear(x, self.head.weight, self.head.bias).float()


def _probe(model: nn.Module, step: Qwen2Step) -> float:
    """Largest relative logit difference between ``step`` and the model's forward over two decode steps."""
    from agentrl.policy.decode import _decode_layers, _forward, _prefill

    config = _causal(model).config
    device = next(model.parameters()).device
    # Past the window when some layer slides, so the probe covers a sliding layer's trimmed cache.
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    length = (config.sliding_window if sliding and config.sliding_window else 16) + 8
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    prompts = [torch.randint(3, vocab, (length,), generator=gen).tolist(),
               torch.randint(3, vocab, (length - 5,), generator=gen).tolist()]
    _, cache, mask = _prefill(model, prompts, 0, device)
    _decode_layers(cache, config, room=4)
    ours, theirs = cache, copy.deepcopy(cache)
    positions = mask.sum(-1)
    worst = 0.0
    for _ in range(2):
        tokens = torch.randint(3, vocab, (2,), generator=gen).to(device)
        mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
        mine = step(tokens, positions, mask, ours)
        reference, theirs = _forward(model, tokens[:, None], mask, positions[:, None], theirs)
        scale = max(1.0, reference.abs().max().item())
        worst = max(worst, (mine - reference).abs().max().item() / scale)
        positions = positions + 1
    return worst


def qwen2_step(model: nn.Module) -> Qwen2Step | None:
    """A :class:`Qwen2Step` for ``model`` if it supports one and (checked once per model) passes the probe.

    Call it only while the model's projections are what ``Qwen2Step`` reads: plain linears, or LoRA layers
    folded by ``merged_lora``.
    """
    verdict = _verdicts.get(model)
    if verdict is None:
        verdict = Qwen2Step.supports(model) and _passes_probe(model)
        _verdicts[model] = verdict
    return Qwen2Step(model) if verdict else None


def _passes_probe(model: nn.Module) -> bool:
    try:
        with torch.no_grad():
            worst = _probe(model, Qwen2Step(model))
    except Exception as exc:  # an unexpected layout: keep the transformers forward
        logger.warning("decode fast path disabled for this model: its probe raised %s: %s", type(exc).__name__, exc)
        return False
    if worst > PROBE_TOLERANCE:
        logger.warning("decode fast path disabled for this model: logits differ from its forward by %.2g "
                       "(tolerance %.0g)", worst, PROBE_TOLERANCE)
        return False
    return True
