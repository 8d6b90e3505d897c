"""Imports every prior backend module so its ``@register(name)`` runs (``base.build_backend`` imports this).

Heavy dependencies (transformers models, vllm, ray.data.llm) are imported inside the backends, when used.
"""

from l2l_ray.priors import hf_backend, lexical, openai_backend, vllm_backend  # noqa: F401
