"""fastrl.integrations.hf.causal_lm_logprobs vs model(...).logits -> log_softmax on tiny random causal LMs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from fastrl.integrations.hf import causal_lm_logprobs  # noqa: E402


def tiny(kind, **extra):
    common = dict(vocab_size=97, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    common.update(extra)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return model.float().eval()


def batch(B=3, T=11, V=97, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0  # right padding
    mask[2, -1] = 0
    return ids, mask


def reference(model, ids, mask, labels, temperature):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    target = labels[:, 1:]
    keep = (target != -100) if mask is None else (mask[:, 1:] != 0) & (target != -100)
    lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_logits_log_softmax_and_gradients(kind, temperature):
    model = tiny(kind)
    ids, mask = batch()
    labels = ids.clone()
    labels[0, 3] = -100
    lp, ent = causal_lm_logprobs(model, ids, mask, labels=labels, temperature=temperature)
    assert lp.shape == ent.shape == (3, 10) and lp.dtype == torch.float32
    (lp.sum() + 0.3 * ent.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    rlp, rent = reference(model, ids, mask, labels, temperature)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    assert lp[0, 2] == 0 and torch.all(lp[1, -4:] == 0) and torch.all(ent[1, -4:] == 0)
    (rlp.sum() + 0.3 * rent.sum()).backward()
    for name, p in model.named_parameters():  # every parameter, the LM head and the decoder's
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_default_labels_tied_embeddings_and_logprob_only():
    model = tiny("qwen2", tie_word_embeddings=True)
    ids, mask = batch(seed=2)
    lp = causal_lm_logprobs(model, ids, mask, return_entropy=False)
    rlp, _ = reference(model, ids, mask, ids, 1.0)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    lp_nomask, _ = causal_lm_logprobs(model, ids)
    torch.testing.assert_close(lp_nomask[0].double(), reference(model, ids, None, ids, 1.0)[0][0], rtol=1e-5, atol=1e-5)


def test_bfloat16_model():
    model = tiny("llama").to(torch.bfloat16)
    ids, mask = batch(seed=3)
    lp, ent = causal_lm_logprobs(model, ids, mask)
    rlp, rent = reference(model, ids, mask, ids, 1.0)  # from the model's own bf16 logits
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-2, atol=5e-2)


def test_bad_input():
    model = tiny("llama")
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"`input_ids` must be \[B, T\]"):
        causal_lm_logprobs(model, ids[0])
    with pytest.raises(ValueError, match="`labels` must have"):
        causal_lm_logprobs(model, ids, mask, labels=ids[:, 1:])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_logprobs(model, ids, mask)
    with pytest.raises(ValueError, match="linear `lm_head`"):
        causal_lm_logprobs(torch.nn.Linear(3, 3), ids)
