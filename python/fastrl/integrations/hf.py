"""Hugging Face causal LMs: per-token (log_probs, entropy) from the fused linear op instead of logits.

A ``transformers`` causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and the like: a decoder
``model.model`` giving hidden states and a linear ``model.lm_head``) normally returns ``[B, T, V]``
logits, which an RL actor (TRL, verl) then turns into log-probs and entropy: the single largest
activation of the step. :func:`causal_lm_logprobs` runs the decoder only and hands its hidden states
and the LM head's weight to :func:`fastrl.linear_logprobs`, which never materializes the logits,
forward or backward (gradients reach every parameter through ordinary autograd).
"""
from __future__ import annotations

import torch

from fastrl.linear_logprobs import linear_logprobs

__all__ = ["causal_lm_logprobs"]

# Config fields of models whose logits are not just ``lm_head(hidden)``: not supported.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def _decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if decoder is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fastrl.causal_lm_logprobs: expected a causal LM with a decoder (`model.model`) and a "
                         f"linear `lm_head`, got {type(model).__name__} (head: {type(head).__name__})")
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"fastrl.causal_lm_logprobs: {type(model).__name__} transforms its logits "
                             f"(config.{name} = {value}); only logits = lm_head(hidden) are supported")
    return decoder, head


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = True,
                       ignore_index: int = -100, **model_kwargs):
    """Log-probs (and entropy) of each next token under a causal LM, without its ``[B, T, V]`` logits.

    Equivalent to (with ``logits = model(input_ids, attention_mask).logits``)::

        logp      = log_softmax(logits[:, :-1] / temperature, -1)
        log_probs = logp.gather(-1, labels[:, 1:, None])[..., 0]
        entropy   = -(logp.exp() * logp).sum(-1)

    i.e. position ``t`` scores token ``t + 1`` given tokens ``<= t`` (the causal-LM shift).
    Positions whose target is padding (``attention_mask[:, 1:] == 0``) or ``ignore_index`` in
    ``labels`` get log-prob 0 and entropy 0 and are skipped before the LM head's matmul.

    Args:
        model: a transformers causal LM whose logits are ``lm_head(decoder(...).last_hidden_state)``.
        input_ids: ``[B, T]`` token ids.
        attention_mask: optional ``[B, T]`` (1 = token, 0 = padding), passed to the decoder.
        labels: ``[B, T]`` targets before the shift (default: ``input_ids``); ``ignore_index`` = skip.
        temperature: ``T > 0`` applied to the logits (as TRL / verl do for the policy's log-probs).
        return_entropy: also return the entropy of each position's distribution.
        model_kwargs: forwarded to the decoder (``position_ids``, ...).

    Returns:
        ``log_probs`` float32 ``[B, T - 1]``, or ``(log_probs, entropy)``.

    >>> lp, ent = causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"])  # doctest: +SKIP
    """
    decoder, head = _decoder_and_head(model)
    if input_ids.dim() != 2:
        raise ValueError(f"fastrl.causal_lm_logprobs: `input_ids` must be [B, T], got {tuple(input_ids.shape)}")
    targets = (input_ids if labels is None else labels)[:, 1:]
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"fastrl.causal_lm_logprobs: `labels` must have `input_ids`' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(labels.shape)}")
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    return linear_logprobs(hidden[:, :-1], head.weight, targets, bias=head.bias, temperature=temperature,
                           return_entropy=return_entropy, ignore_index=ignore_index)
