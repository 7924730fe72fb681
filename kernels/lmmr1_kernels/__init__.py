"""lmmr1_kernels: per-token log-probs and the GRPO loss straight from hidden states and the LM head.

Source lives in `kernels/lmmr1_kernels/`; `kernels/` itself has no `__init__.py` on purpose: the name
`kernels` belongs to a Hugging Face distribution that transformers and bitsandbytes probe for, and a
regular package of that name on sys.path (the repo root, under `python -m ...`) would be taken for it.
"""
from .backend import BACKENDS, resolve_backend
from .grpo_loss import LOSS_AGGREGATIONS, grpo_loss, token_weights
from .logprobs import token_logprobs

__all__ = ["BACKENDS", "LOSS_AGGREGATIONS", "grpo_loss", "resolve_backend", "token_logprobs", "token_weights"]
