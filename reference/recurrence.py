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
        h_prev = torch.zeros(x.shape[0], dtype=x.dtype)
        hs = []
        for t in range(x.shape[1]):
            h_prev = self.w_x.to(x.dtype) * x[:, t] + self.w_h.to(x.dtype) * h_prev
            hs.append(h_prev)
        h = torch.stack(hs, dim=1)
        act = torch.sigmoid if self.activation == "sigmoid" else torch.tanh
        return act(self.gain * h), h


def compare_rows(repeat: int = 3):
    """Rows for ``python -m reference.compare``: loop and closed form vs this module."""
    import numpy as np

    from scratch import recurrence as scratch_rec

    from .compare import compare_row

    x = np.random.default_rng(0).standard_normal((256, 200))
    xt = torch.from_numpy(x)
    ref = AlternatingRNN()

    def torch_h():
        with torch.no_grad():
            return ref(xt)

    rnn = scratch_rec.AlternatingRNN()
    return [
        compare_row("toy recurrence: loop y, h (256x200, f64)", lambda: rnn(x), torch_h, repeat),
        compare_row("toy recurrence: closed form h (256x200, f64)",
                    lambda: scratch_rec.closed_form(x), lambda: torch_h()[1], repeat),
    ]
