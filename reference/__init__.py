"""Torch versions of everything in ``scratch/`` (autograd gives the gradients), the real
BERT-BiGRU IMDB pipeline, and the scratch-vs-reference comparison."""
