"""Names of the RAG triplet strategies (import-light, for the CLI)."""

STRATEGIES: tuple[str, ...] = ("positive", "contrastive", "similar")
