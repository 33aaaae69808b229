"""Toy training under DistributedDataParallel for tests/test_distributed.py, in a module light
enough to import fast in each process torch.multiprocessing spawns (no transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from reference.model import GRUHead
from reference.pipeline import train
from reference.pipeline.distributed import SINGLE, Ranks, close_group, rank_seed
from tests.test_train import splits, toy_data


def fit_worker(rank, size, port, out):
    """One rank: ``fit`` on toy data with dropout 0 and 0.25, under DDP (gloo, loopback)."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=timedelta(seconds=120))
    ranks = Ranks(rank, size)
    grads = batch_gradients(ranks)
    if rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
    histories = {}
    for dropout in (0.0, 0.25):
        histories[dropout] = fit_toy(Path(out) / f"ddp{dropout}", dropout, ranks)
    if rank == 0:
        (Path(out) / "histories.json").write_text(json.dumps(histories))
    close_group()


def toy_head(dropout: float) -> tuple[GRUHead, dict]:
    model = dict(emb_dim=4, hidden_dim=3, output_dim=1, n_layers=2, bidirectional=True,
                 dropout=dropout)
    torch.manual_seed(0)
    return GRUHead(**model), model


class GradientRecorder:
    """An optimizer that records the gradient of every step and leaves the weights alone."""

    def __init__(self, module):
        self.module, self.grads = module, []

    def zero_grad(self):
        self.module.zero_grad()

    def step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.module.named_parameters()})


def batch_gradients(ranks: Ranks = SINGLE) -> list[dict]:
    """The gradient of every global batch of one epoch (dropout 0, the same weights for all),
    averaged over the ranks by DDP: each should be the one-process batch-mean gradient."""
    store, labels = toy_data(62)
    tr, _ = splits(store, labels)
    head, _ = toy_head(0.0)
    rec = GradientRecorder(head)
    train.run_epoch(ranks.wrap(head, "cpu"), tr, 8, rec, seed=1, ranks=ranks)
    return rec.grads


def fit_toy(out, dropout, ranks: Ranks = SINGLE):
    """42 train reviews in global batches of 8: the last batch holds 2, so one of 3 ranks has
    an empty slice."""
    store, labels = toy_data(62)
    tr, va = splits(store, labels)
    head, model = toy_head(dropout)
    if not ranks.main:
        torch.manual_seed(rank_seed(0, ranks.rank))
    return train.fit(head, tr, va, out, epochs=4, batch_size=8, seed=1, lr=1e-2, log=str,
                     config={"model": model}, ranks=ranks)
