"""lmmr1_kernels: per-token log-probs and the GRPO loss straight from hidden states and the LM head.

Import name `lmmr1_kernels` (this folder, `kernels/`, is mapped to it in pyproject.toml): the name
`kernels` belongs to a Hugging Face distribution that transformers and bitsandbytes probe for.
"""
if __name__ == "kernels":  # imported by path from the repo root, e.g. when bitsandbytes probes `import kernels`
    raise ImportError("the folder kernels/ is the package lmmr1_kernels, not the Hugging Face 'kernels' package")

from .backend import BACKENDS, resolve_backend
from .grpo_loss import LOSS_AGGREGATIONS, grpo_loss, token_weights
from .logprobs import token_logprobs

__all__ = ["BACKENDS", "LOSS_AGGREGATIONS", "grpo_loss", "resolve_backend", "token_logprobs", "token_weights"]
