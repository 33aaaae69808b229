"""The assignment's BERT + bidirectional-GRU sentiment model, with three fixes and a fast exact
packed GRU.

The assignment (``faithful=True`` reproduces it exactly)::

    with torch.no_grad():
        embedded = self.bert(text)[0]                 # (B, T, E), [PAD] attended to
    _, hidden = self.rnn(embedded)                    # GRU runs over the [PAD] tail too
    hidden = self.dropout(torch.cat((hidden[-2], hidden[-1]), dim=1))
    return self.out(hidden)                           # (B, 1) logit

Three fixes, on by default (``faithful=False``):

1. BERT gets the attention mask (``text != [PAD]``), so [PAD] tokens are not attended to;
2. the GRU reads each review only up to its length (``pack_padded_sequence`` semantics): the
   forward direction's final state is taken at the last real token, the reverse direction
   starts at the last real token.  With 1 and 2, padding a review with more [PAD] tokens does
   not change its score;
3. the frozen encoder stays in eval mode (no dropout inside BERT) while the head trains.

Fast exact packing.  torch's packed path (``pack_padded_sequence``) is ~9x slower than the
padded path on CPU.  :func:`packed_gru_final` computes the same numbers with the padded
kernel: per layer, the forward direction runs over the padded batch (it is causal, so outputs
at ``t < L_i`` never see the padding) and the reverse direction runs forward over each review's
real tokens reversed in place (``x[i, L_i-1-t]`` for ``t < L_i``; the padding stays at the tail,
where it is never read back).  Final states are read at ``t = L_i - 1`` in each direction's own
time order.  With length-bucketed batches (:func:`reference.pipeline.data.bucket_batches`) the
wasted work on the tail is small.

:class:`GRUHead` is the part after BERT (``rnn``, ``dropout``, ``out``): it trains on cached
encoder features.  :class:`BERTGRUSentiment` is a ``GRUHead`` with ``self.bert`` in front, so its
``state_dict`` has the assignment's names (``bert.*``, ``rnn.*``, ``out.*``) and a head
checkpoint loads into either.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``lengths[i]`` steps, leave the tail in place; an involution.

    x: (B, T, D), lengths: (B,) -> (B, T, D) with ``y[i, t] = x[i, L_i - 1 - t]`` for
    ``t < L_i`` and ``y[i, t] = x[i, t]`` otherwise.  (One ``index_select`` on the flattened
    batch: its backward is cheaper on CPU than ``gather``'s scatter.)
    """
    B, T = x.shape[:2]
    t = torch.arange(T, device=x.device).unsqueeze(0)
    L = lengths.to(x.device).unsqueeze(1)
    idx = torch.where(t < L, L - 1 - t, t) + T * torch.arange(B, device=x.device).unsqueeze(1)
    return x.reshape(B * T, *x.shape[2:]).index_select(0, idx.reshape(-1)).reshape(x.shape)


def _at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x: (B, T, D), pos: (B,) -> (B, D), ``x[i, pos[i]]``."""
    return x[torch.arange(x.shape[0], device=x.device), pos.to(x.device)]


class _Direction:
    """One layer, one direction of an ``nn.GRU``, run through the padded kernel with the parent's
    parameters (``torch.func.functional_call``: gradients flow to the parent's tensors)."""

    def __init__(self, rnn: nn.GRU, layer: int, reverse: bool):
        d_in = rnn.input_size if layer == 0 else rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.cell = nn.GRU(d_in, rnn.hidden_size, 1, bias=rnn.bias, batch_first=True,
                           device="meta")
        sfx = f"_l{layer}" + ("_reverse" if reverse else "")
        self.names = {n: n.replace("_l0", sfx) for n, _ in self.cell.named_parameters()}

    def __call__(self, rnn: nn.GRU, x: torch.Tensor) -> torch.Tensor:
        params = {mine: getattr(rnn, theirs) for mine, theirs in self.names.items()}
        h0 = x.new_zeros(1, x.shape[0], rnn.hidden_size)
        return functional_call(self.cell, params, (x, h0))[0]


class PackedGRU:
    """``nn.GRU`` (batch_first) final states with packed-sequence semantics, computed fast."""

    def __init__(self, rnn: nn.GRU):
        if not rnn.batch_first:
            raise ValueError("PackedGRU expects an nn.GRU built with batch_first=True")
        reverses = (False, True) if rnn.bidirectional else (False,)
        self.dirs = [[_Direction(rnn, k, r) for r in reverses] for k in range(rnn.num_layers)]

    def __call__(self, rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor,
                 masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, E), lengths: (B,) in 1..T -> h_n: (num_layers * num_directions, B, H), the
        same as
        ``rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[1]``.
        Between layers, dropout ``rnn.dropout`` is applied when ``rnn.training`` (as nn.GRU).

        ``masks``: given dropout masks instead of drawn ones (then ``rnn.training`` is not
        looked at): one per layer but the last, each (B, T, D H) in layer k's output layout
        (batch first, forward time: the layout of scratch.gru's ``dropout_masks``), values 0 or
        1 / (1 - p); an empty list means no dropout."""
        if masks is not None:
            D_H = len(self.dirs[0]) * rnn.hidden_size
            masks = check_masks(masks, len(self.dirs) - 1, (*x.shape[:2], D_H), x)
        last = (lengths.to(x.device) - 1).long()
        bi, h_n = len(self.dirs[0]) == 2, []
        fwd_in, rev_in = x, (reverse_within_length(x, lengths) if bi else None)
        for k, dirs in enumerate(self.dirs):
            f = dirs[0](rnn, fwd_in)                      # f[:, t]: step t
            h_n.append(_at(f, last))
            if bi:
                r = dirs[1](rnn, rev_in)                  # r[:, t]: step L-1-t (own time order)
                h_n.append(_at(r, last))
            if k == len(self.dirs) - 1:
                break
            if bi:   # next layer's input in both time orders, reversing each half once
                fwd_in = torch.cat((f, reverse_within_length(r, lengths)), dim=2)
                rev_in = torch.cat((reverse_within_length(f, lengths), r), dim=2)
            else:
                fwd_in = f
            if masks is not None:                         # given: (B, T, D H), forward time
                keep = masks[k] if masks else None
            elif rnn.training and rnn.dropout > 0:        # one mask, seen by both directions
                keep = torch.empty_like(fwd_in).bernoulli_(1 - rnn.dropout) / (1 - rnn.dropout)
            else:
                keep = None
            if keep is not None:
                fwd_in = fwd_in * keep
                if bi:
                    rev_in = rev_in * reverse_within_length(keep, lengths)
        return torch.stack(h_n)


def check_masks(masks, n: int, shape: tuple, like: torch.Tensor) -> list[torch.Tensor]:
    """``masks`` (tensors or arrays) as a list of ``n`` tensors of ``shape`` on ``like``'s device
    and dtype (or empty: no dropout)."""
    masks = [torch.as_tensor(m, dtype=like.dtype, device=like.device) for m in masks]
    if masks and (len(masks) != n or any(tuple(m.shape) != tuple(shape) for m in masks)):
        raise ValueError(f"dropout masks: expected {n} of shape {tuple(shape)} (or none), got "
                         f"{[tuple(m.shape) for m in masks]}")
    return masks


def check_lengths(lengths: torch.Tensor, batch: int, steps: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
        raise ValueError(f"lengths must be in 1..{steps} (the padded length), "
                         f"got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths


class GRUHead(nn.Module):
    """The assignment's head: ``nn.GRU`` -> dropout(cat(hidden[-2], hidden[-1])) -> Linear.

    ``head(features, lengths)``: features (B, T, emb_dim) float, lengths (B,) int or None (all
    T real) -> logits (B, output_dim).  ``faithful=True`` ignores ``lengths`` and runs the GRU
    over the whole padded batch, as the assignment did.
    """

    def __init__(self, emb_dim: int, hidden_dim: int, output_dim: int, n_layers: int,
                 bidirectional: bool, dropout: float, faithful: bool = False):
        super().__init__()
        self.faithful = faithful
        self.rnn = nn.GRU(emb_dim, hidden_dim, num_layers=n_layers, bidirectional=bidirectional,
                          batch_first=True, dropout=0 if n_layers < 2 else dropout)
        self.out = nn.Linear(hidden_dim * 2 if bidirectional else hidden_dim, output_dim)
        self.dropout = nn.Dropout(dropout)
        self._packed = PackedGRU(self.rnn)

    def head(self, features: torch.Tensor, lengths: torch.Tensor | None = None,
             masks: dict | None = None) -> torch.Tensor:
        """features (B, T, E), lengths (B,) or None -> logits (B, output_dim).

        ``masks``: dropout masks to apply instead of drawing them (for comparing with
        scratch.sentiment, which records its own): ``{"rnn": [one (B, T, D H) per layer but
        the last], "hidden": (B, D H) or None}``, values 0 or 1 / (1 - p); empty or None
        entries mean no dropout there, whatever the training mode.  The GRU then always runs
        through :class:`PackedGRU` (lengths None or ``faithful``: every review T long)."""
        if features.dim() != 3 or features.shape[2] != self.rnn.input_size:
            raise ValueError(f"features must be (batch, time, {self.rnn.input_size}), "
                             f"got {tuple(features.shape)}")
        B, T = features.shape[:2]
        if masks is not None:
            if self.faithful or lengths is None:
                lengths = torch.full((B,), T, dtype=torch.int64)
            lengths = check_lengths(lengths, B, T)
            hidden = self._packed(self.rnn, features, lengths, masks.get("rnn") or [])
        elif self.faithful or lengths is None:
            _, hidden = self.rnn(features)
        else:
            lengths = check_lengths(lengths, B, T)
            hidden = self._packed(self.rnn, features, lengths)
        if self.rnn.bidirectional:
            hidden = torch.cat((hidden[-2], hidden[-1]), dim=1)
        else:
            hidden = hidden[-1]
        if masks is None:
            hidden = self.dropout(hidden)
        elif masks.get("hidden") is not None:
            keep = torch.as_tensor(masks["hidden"], dtype=hidden.dtype, device=hidden.device)
            if tuple(keep.shape) != tuple(hidden.shape):
                raise ValueError(f"dropout mask 'hidden' must have shape {tuple(hidden.shape)}, "
                                 f"got {tuple(keep.shape)}")
            hidden = hidden * keep
        return self.out(hidden)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None,
                masks: dict | None = None) -> torch.Tensor:
        return self.head(features, lengths, masks)


class BERTGRUSentiment(GRUHead):
    """The assignment's class and constructor: ``bert`` (a transformers ``BertModel``), then the
    :class:`GRUHead` on its last hidden states (emb_dim = ``bert.config.hidden_size``).

    ``forward(text, attention_mask=None)``: text (B, T) token ids, right-padded with [PAD]
    -> logits (B, output_dim).  The mask defaults to ``text != pad_token_id``; review lengths
    are its row sums.  BERT always runs under ``no_grad`` (it is frozen; see
    :func:`freeze_bert` for the assignment's requires_grad loop).
    """

    def __init__(self, bert, hidden_dim: int, output_dim: int, n_layers: int,
                 bidirectional: bool, dropout: float, faithful: bool = False):
        super().__init__(bert.config.hidden_size, hidden_dim, output_dim, n_layers,
                         bidirectional, dropout, faithful)
        self.bert = bert
        self.pad_id = bert.config.pad_token_id if bert.config.pad_token_id is not None else 0
        if not faithful:
            self.bert.eval()

    def train(self, mode: bool = True):
        """As nn.Module.train, but the frozen encoder stays in eval mode (fix 3)."""
        super().train(mode)
        if not self.faithful:
            self.bert.eval()
        return self

    def encode(self, text: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """text (B, T) -> (features (B, T, E), lengths (B,)); with fixes 1 and 2 unless faithful."""
        if text.dim() != 2:
            raise ValueError(f"text must be (batch, time) token ids, got {tuple(text.shape)}")
        with torch.no_grad():
            if self.faithful:
                return self.bert(text)[0], None
            if attention_mask is None:
                attention_mask = (text != self.pad_id).long()
            return self.bert(text, attention_mask=attention_mask)[0], attention_mask.sum(1)

    def forward(self, text: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.head(*self.encode(text, attention_mask))


def freeze_bert(model: nn.Module) -> nn.Module:
    """The assignment's freezing: every parameter whose name starts with 'bert' stops learning."""
    for name, param in model.named_parameters():
        if name.startswith("bert"):
            param.requires_grad = False
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
