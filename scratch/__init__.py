"""From-scratch NumPy (or CuPy) implementations: the toy recurrence, a torch-exact GRU and
three kinds of attention, each with its backward pass, and the frozen BERT encoder (forward,
read from safetensors). Nothing here imports torch."""
