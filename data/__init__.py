"""Text -> token rows (streaming corpora, tokenizers, packing, mixtures). Knows nothing of models or training."""
