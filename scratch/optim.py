r"""Adam (Kingma & Ba, 2015), step for step equal to ``torch.optim.Adam``.

For every parameter p with gradient g, at step t = 1, 2, ... (Algorithm 1 of the paper, with
torch's L2 term and eps placement)::

    g     <- g + weight_decay * p                   L2 added to the gradient (not AdamW)
    m     <- beta1 m + (1 - beta1) g                first moment
    v     <- beta2 v + (1 - beta2) g^2              second moment
    m_hat  = m / (1 - beta1^t)                      bias corrections
    v_hat  = v / (1 - beta2^t)
    v_max <- max(v_max, v)   (amsgrad only; then v_hat = v_max / (1 - beta2^t))
    p     <- p - lr m_hat / (sqrt(v_hat) + eps)     eps outside the square root

m, v (and v_max) start at 0, one t per parameter (as torch: a parameter that gets no gradient
in a step is skipped and its t does not advance).  The arrays are updated in place, so a model
holding them sees the new values.  ``state_dict()`` / ``load_state_dict()`` carry t, m, v
(and v_max): a run resumed from them follows the same trajectory as one never stopped.

    opt = Adam(head.params, lr=1e-3)       # {name: array}, updated in place
    opt.step(grads)                        # grads: {name: array}, same names and shapes
"""
from __future__ import annotations

import math

import numpy as np

from .backend import array_module, to_numpy

HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad")


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay, amsgrad)`` over a dict of arrays.

    params: {name: float array} (NumPy or CuPy); each is updated in place by :meth:`step`.
    ``lr``, ``betas``, ``eps``, ``weight_decay`` may be changed between steps (attributes).
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        _check_hyper(lr, betas, eps, weight_decay)
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict {name: array}")
        for name, p in params.items():
            if getattr(p, "dtype", None) is None or p.dtype.kind != "f":
                raise ValueError(f"parameter {name!r} must be a float array, got "
                                 f"{type(p).__name__}")
        self.params = params
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay, self.amsgrad = float(weight_decay), bool(amsgrad)
        self.state: dict[str, dict] = {}        # name -> {"step": t, "exp_avg": m, ...}

    # ---- the update --------------------------------------------------------------------------

    def step(self, grads: dict) -> None:
        """One Adam step for every parameter named in ``grads`` (same shapes as the params)."""
        unknown = [k for k in grads if k not in self.params]
        if unknown:
            raise ValueError(f"gradients for unknown parameters {unknown}")
        for name, g in grads.items():
            if g is None:
                continue
            p = self.params[name]
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient {name!r} has shape {tuple(g.shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            self._update(p, g.astype(p.dtype, copy=False), self._state_of(name, p))

    def _update(self, p, g, s) -> None:
        xp = array_module(p)
        beta1, beta2 = self.betas
        s["step"] += 1
        t = s["step"]
        if self.weight_decay != 0:
            g = g + self.weight_decay * p                      # L2 in the gradient
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m *= beta1                                             # m = beta1 m + (1 - beta1) g
        m += (1 - beta1) * g
        with np.errstate(over="ignore"):   # |g| > 1e154: g^2 = inf, as in torch (p then stays)
            v *= beta2                                         # v = beta2 v + (1 - beta2) g^2
            v += (1 - beta2) * (g * g)
        if self.amsgrad:
            xp.maximum(s["max_exp_avg_sq"], v, out=s["max_exp_avg_sq"])
            v = s["max_exp_avg_sq"]
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = xp.sqrt(v) / math.sqrt(bias2) + self.eps       # sqrt(v_hat) + eps
        p -= (self.lr / bias1) * m / denom                     # lr m_hat / (sqrt(v_hat) + eps)

    def _state_of(self, name, p) -> dict:
        s = self.state.get(name)
        if s is None:
            xp = array_module(p)
            s = self.state[name] = {"step": 0, "exp_avg": xp.zeros_like(p),
                                    "exp_avg_sq": xp.zeros_like(p)}
            if self.amsgrad:
                s["max_exp_avg_sq"] = xp.zeros_like(p)
        return s

    # ---- saving and resuming -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """{"hyper": {lr, betas, eps, weight_decay, amsgrad}, "state": {name: {"step": int,
        "exp_avg": array, "exp_avg_sq": array[, "max_exp_avg_sq": array]}}}: host NumPy copies."""
        return {"hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": self.weight_decay, "amsgrad": self.amsgrad},
                "state": {name: {k: (int(v) if k == "step" else to_numpy(v).copy())
                                 for k, v in s.items()} for name, s in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`'s output (arrays may be NumPy, CuPy or torch tensors).
        Unknown names, wrong shapes, a missing moment or a negative step are a ValueError; nothing
        is changed then."""
        hyper = sd.get("hyper", {})
        missing = [k for k in HYPER if k not in hyper]
        if missing or "state" not in sd:
            raise ValueError(f"Adam state_dict incomplete: missing {missing or ['state']}")
        _check_hyper(hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"])
        amsgrad = bool(hyper["amsgrad"])
        keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
        state = {}
        for name, s in sd["state"].items():
            if name not in self.params:
                raise ValueError(f"Adam state for unknown parameter {name!r}")
            if set(s) != keys:
                raise ValueError(f"Adam state of {name!r} has keys {sorted(s)}, expected "
                                 f"{sorted(keys)}")
            p, xp = self.params[name], array_module(self.params[name])
            step = int(s["step"])
            if step < 0 or step != s["step"]:
                raise ValueError(f"Adam step of {name!r} must be an integer >= 0, got "
                                 f"{s['step']!r}")
            new = {"step": step}
            for k in keys - {"step"}:
                a = np.asarray(to_numpy(s[k]))
                if a.shape != tuple(p.shape):
                    raise ValueError(f"Adam {k} of {name!r} has shape {a.shape}, the parameter "
                                     f"{tuple(p.shape)}")
                if not np.isfinite(a).all():
                    raise ValueError(f"Adam {k} of {name!r} contains NaN or inf")
                new[k] = xp.asarray(a.astype(p.dtype, copy=True))
            state[name] = new
        self.lr, self.eps = float(hyper["lr"]), float(hyper["eps"])
        self.betas = (float(hyper["betas"][0]), float(hyper["betas"][1]))
        self.weight_decay, self.amsgrad = float(hyper["weight_decay"]), amsgrad
        self.state = state

    def __repr__(self):
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, amsgrad={self.amsgrad}, "
                f"{len(self.params)} parameters)")


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    """torch's checks: lr, eps, weight_decay >= 0, betas in [0, 1)."""
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"invalid learning rate: {lr!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"invalid eps: {eps!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"invalid betas: {betas!r} (two numbers in [0, 1))")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"invalid weight_decay: {weight_decay!r}")
