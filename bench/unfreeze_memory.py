"""Peak memory of one ``--unfreeze-top K`` training step at a realistic shape, either pipeline.

    .venv/bin/python bench/unfreeze_memory.py --side scratch --k 1 [--batch 128 --tokens 512
        --hidden 768 --micro-batch-tokens 8192 --dtype float32]

Builds a bert-base-shaped layer stack (hidden 768, 12 heads, 3072 inner units; random weights,
nothing downloaded), the assignment's head (BiGRU 256 x 2, dropout 0.25) and a batch of
``--batch`` reviews of ``--tokens`` tokens (the worst case: no review shorter), then runs one
training step exactly as ``{scratch,reference}.pipeline.train`` does (:func:`top_batch`:
micro-batches of at most ``--micro-batch-tokens`` padded tokens, gradients accumulated, one
Adam step).  Prints the process's peak resident memory before and after the step
(``ru_maxrss``), and the step's time.  Run each configuration in a fresh process.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux


class Store:
    """``n`` reviews of ``tokens`` hidden states each (random, float16 like the cache)."""

    def __init__(self, n, tokens, hidden, torch_batches=False):
        rng = np.random.default_rng(0)
        self.one = rng.standard_normal((tokens, hidden)).astype(np.float16)
        self.lengths = np.full(n, tokens)
        self.hidden_size, self.torch_batches = hidden, torch_batches

    def batch(self, indices, dtype=np.float32):
        x = np.broadcast_to(self.one, (len(indices), *self.one.shape)).astype(dtype)
        if self.torch_batches:
            import torch

            return torch.from_numpy(x), torch.from_numpy(self.lengths[indices])
        return x, self.lengths[indices]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("scratch", "reference"), required=True)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    a = p.parse_args()
    H, heads, inner, n_layers = a.hidden, a.hidden // 64, 4 * a.hidden, 12
    head_args = dict(emb_dim=H, hidden_dim=256, output_dim=1, n_layers=2, bidirectional=True,
                     dropout=0.25)
    y = (np.arange(a.batch) % 2).astype(a.dtype)
    b = np.arange(a.batch)
    if a.side == "scratch":
        from scratch.encoder_layer import EncoderLayer, param_shapes
        from scratch.pipeline import train
        from scratch.sentiment import SentimentHead
        from scratch.top_layers import TopHead, TopLayers

        rng = np.random.default_rng(1)
        layers = {i: EncoderLayer({n: rng.standard_normal(s) * 0.02 + (n.endswith(
            "LayerNorm.weight")) for n, s in param_shapes(H, inner).items()}, heads,
            dtype=a.dtype, seed=i) for i in range(n_layers - a.k, n_layers)}
        model = TopHead(TopLayers(layers), SentimentHead(**head_args, dtype=a.dtype, seed=0))
        optimizer = train.GroupedAdam(model, 1e-3, 2e-5)
        split = train.Split(Store(a.batch, a.tokens, H), b, y)
        before = peak_gib()
        t0 = time.perf_counter()
        train.top_batch(model, split, b, y, optimizer, a.micro_batch_tokens)
    else:
        import torch
        from transformers import BertConfig

        from reference.pipeline import train
        from reference.top_layers import TopGRUHead

        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=H, num_attention_heads=heads, intermediate_size=inner,
                         num_hidden_layers=n_layers)
        model = TopGRUHead(cfg, n_layers - a.k, **head_args).to(getattr(torch, a.dtype))
        model.train()
        optimizer = torch.optim.Adam([
            {"params": [q for n, q in model.named_parameters() if not n.startswith("encoder.")]},
            {"params": list(model.encoder.parameters()), "lr": 2e-5}], lr=1e-3)
        split = train.Split(Store(a.batch, a.tokens, H, torch_batches=True), b, y)
        before = peak_gib()
        t0 = time.perf_counter()
        with train.flush_denormals():                      # as reference.pipeline.train.fit
            train.top_batch(model, split, b, torch.as_tensor(y), 1.0 / a.batch, optimizer,
                            a.micro_batch_tokens)
    seconds = time.perf_counter() - t0
    print(f"{a.side} K={a.k} batch {a.batch} x {a.tokens} tokens x {H} wide, {a.dtype}, "
          f"micro-batches of {a.micro_batch_tokens} tokens: peak RSS {before:.2f} GiB before "
          f"the step, {peak_gib():.2f} GiB after; step {seconds:.0f} s "
          f"({os.environ.get('OMP_NUM_THREADS', 'all')} threads)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
