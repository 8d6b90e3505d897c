"""Prior backends (MLLM or lexical) -> ``Prior`` records with soft proposals, cached on disk."""
