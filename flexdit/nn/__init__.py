"""Building blocks shared by every backbone: embeddings, token mixers, the adaLN-Zero block, density ops."""
