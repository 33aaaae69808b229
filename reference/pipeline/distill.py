r"""Recovery by distillation: retrain only the swapped layers' query and key projections so
that the swapped encoder's layer outputs come back to the softmax encoder's.

Student ``S``: the encoder with Efficient or linear attention in the layers ``ℒ``
(:func:`reference.bert_attention.swap_attention`); teacher ``T``: the same weights with BERT's
softmax attention.  On a batch of ``B`` texts of ``T_max`` tokens, ``m_bt = 1`` on real tokens::

    loss = 1/|ℒ| sum_{l in ℒ}  sum_{b,t} m_bt ||S_l(x)_bt - T_l(x)_bt||^2 / (H sum_{b,t} m_bt)

``S_l, T_l`` the outputs of layer ``l`` (``hidden_states[l + 1]``, each (B, T_max, H)).
Trainable: ``W_q, b_q, W_k, b_k`` of the layers in ``ℒ``, ``2 (H^2 + H)`` numbers per layer;
everything else (embeddings, values, output projections, feed-forward, LayerNorms, the other
layers) stays frozen, so the student keeps the teacher's ``V`` and only learns *where to look*
under the new attention.  Adam, batches of texts drawn without replacement (a new permutation
each pass), the student in eval mode (no dropout: the frozen encoder's setting).

Only the texts given are used (the experiment passes the head's training reviews: no
validation or test text); the loss is reported on a separate ``probe`` set before and after.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from scratch.pipeline.tokenizer import pad_batch


def qk_parameters(model, layers) -> list[torch.nn.Parameter]:
    """Freeze every parameter of ``model`` (a BertModel), then make the query and key
    projections (weight and bias) of ``layers`` trainable; returns those parameters."""
    model.requires_grad_(False)
    params = []
    for layer in layers:
        attn = model.encoder.layer[layer].attention.self
        for p in (*attn.query.parameters(), *attn.key.parameters()):
            p.requires_grad_(True)
            params.append(p)
    return params


def layer_mse(student_states, teacher_states, mask: torch.Tensor, layers) -> torch.Tensor:
    """The loss of the module docstring: mean over ``layers`` of the masked mean squared error
    between ``hidden_states[l + 1]`` of student and teacher; ``mask`` (B, T) 1 = real token."""
    dtype = torch.promote_types(student_states[0].dtype, torch.float32)  # bf16 -> float32
    m = mask.to(dtype)[..., None]                                      # (B, T, 1)
    denom = m.sum() * student_states[0].shape[-1]
    def term(layer: int) -> torch.Tensor:
        diff = student_states[layer + 1].to(dtype) - teacher_states[layer + 1].to(dtype)
        return ((diff ** 2) * m).sum() / denom

    return torch.stack([term(layer) for layer in layers]).mean()


def _amp(autocast: bool):
    return (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
            else contextlib.nullcontext())


def _states(model, ids: np.ndarray, mask: np.ndarray):
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 output_hidden_states=True).hidden_states


def probe_loss(student, teacher, probe: list[np.ndarray], layers, pad_id: int,
               autocast: bool, batch_size: int = 16) -> float:
    """:func:`layer_mse` over the whole ``probe`` set (token-weighted across its batches)."""
    total, tokens = 0.0, 0
    with torch.no_grad(), _amp(autocast):
        for i in range(0, len(probe), batch_size):
            ids, mask = pad_batch(probe[i:i + batch_size], pad_id)
            loss = layer_mse(_states(student, ids, mask), _states(teacher, ids, mask),
                             torch.from_numpy(mask), layers)
            total += float(loss) * int(mask.sum())
            tokens += int(mask.sum())
    return total / tokens


def distill(student, teacher, texts: list[np.ndarray], layers, *, steps: int,
            batch_size: int = 16, lr: float = 1e-3, seed: int = 3407, pad_id: int = 0,
            autocast: bool = False, probe: list[np.ndarray] | None = None,
            progress: bool = False, every: int = 10) -> dict:
    """Train ``student``'s query/key projections in ``layers`` for ``steps`` Adam steps on
    batches of ``texts`` (token id arrays); ``teacher`` is not changed.  Returns a report:
    steps, seconds, cpu_seconds, trainable parameters, the probe loss before and after, and the
    training loss averaged over each ``every`` steps."""
    if steps < 1 or batch_size < 1 or not texts:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and texts, got steps={steps}, "
                         f"batch_size={batch_size}, {len(texts)} texts")
    student.eval()
    teacher.eval()
    params = qk_parameters(student, layers)
    optimizer = torch.optim.Adam(params, lr=lr)
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "layers": list(layers),
              "trainable_parameters": int(sum(p.numel() for p in params)),
              "texts": len(texts), "autocast_bf16": autocast}
    if probe:
        report["probe_texts"] = len(probe)
        report["probe_loss_before"] = probe_loss(student, teacher, probe, layers, pad_id, autocast)
    rng = np.random.default_rng(seed)
    order, pos, curve, window = rng.permutation(len(texts)), 0, [], []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="distill q/k", disable=not progress, leave=False)
    for step in bar:
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(texts)), 0
        ids, mask = pad_batch([texts[i] for i in order[pos:pos + batch_size]], pad_id)
        pos += batch_size
        with torch.no_grad(), _amp(autocast):
            target = _states(teacher, ids, mask)
        with _amp(autocast):
            loss = layer_mse(_states(student, ids, mask), target, torch.from_numpy(mask), layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append(float(loss.detach()))
        if len(window) == every or step == steps - 1:
            curve.append({"step": step + 1, "loss": float(np.mean(window))})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4g}")
            window = []
    report.update(seconds=round(time.perf_counter() - t0, 1),
                  cpu_seconds=round(time.process_time() - c0, 1), curve=curve)
    student.requires_grad_(False)
    if probe:
        report["probe_loss_after"] = probe_loss(student, teacher, probe, layers, pad_id, autocast)
    return report
