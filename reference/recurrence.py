"""The toy recurrence in torch: a module whose forward *is* the recurrence, so autograd gives
d/dx, d/dw_x and d/dw_h.  Same maths as :mod:`scratch.recurrence`."""
from __future__ import annotations

import torch
from torch import nn


class AlternatingRNN(nn.Module):
    """h_t = w_x x_t + w_h h_{t-1}, h_0 = 0, y_t = act(gain h_t); x: (batch, time)."""

    def __init__(self, gain: float = 1000.0, activation: str = "sigmoid",
                 w_x: float = 1.0, w_h: float = -1.0, dtype=torch.float64):
        super().__init__()
        if activation not in ("sigmoid", "tanh"):
            raise ValueError(f"activation must be 'sigmoid' or 'tanh', got {activation!r}")
        self.gain, self.activation = gain, activation
        self.w_x = nn.Parameter(torch.tensor(w_x, dtype=dtype))
        self.w_h = nn.Parameter(torch.tensor(w_h, dtype=dtype))

    def forward(self, x: torch.Tensor):
        h_prev = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        hs = []
        for t in range(x.shape[1]):
            h_prev = self.w_x.to(x.dtype) * x[:, t] + self.w_h.to(x.dtype) * h_prev
            hs.append(h_prev)
        h = torch.stack(hs, dim=1)
        act = torch.sigmoid if self.activation == "sigmoid" else torch.tanh
        return act(self.gain * h), h

