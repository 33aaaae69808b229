"""From-scratch NumPy (or CuPy) implementations: the toy recurrence, a torch-exact GRU and
three kinds of attention, each with its backward pass. Nothing here imports torch."""
