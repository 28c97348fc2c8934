"""Models: prompts, training examples, tokenizers, loading (hub, LoRA, integrity), the recipe,
batched and constrained generation, embeddings and ``CellSentenceModel``."""
