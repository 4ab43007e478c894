"""Triton kernels of fastrl (imported lazily: only CUDA tensors, or tests under ``TRITON_INTERPRET=1``,
use them). :mod:`fastrl.triton.linear_logprobs`: log-probs / entropy from hidden states x LM head."""
