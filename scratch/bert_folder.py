"""Reading a Hugging Face BERT folder without torch: ``config.json`` (checked: model type,
sizes, activation) and the tensors of ``model.safetensors`` the encoder needs (checked: present,
shapes from the config, float dtype, finite), through ``safetensors``' NumPy reader.

Names are ``BertModel``'s (``embeddings.word_embeddings.weight``, ``encoder.layer.0...``);
checkpoints that prefix them with ``bert.`` (``BertForMaskedLM``, the original
bert-base-uncased) or call LayerNorm's parameters ``gamma``/``beta`` are read too.  Tensors the
encoder does not use (pooler, heads, ``position_ids``) are never read.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np

from .activations import ACTIVATIONS

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class BertError(ValueError):
    """A BERT folder, its weights, an option or an input is not what the encoder can use
    (the message names the file, tensor, option or input and the problem)."""



@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` the forward pass needs (checked on load)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_folder(cls, folder: Path) -> BertConfig:
        path = Path(folder) / CONFIG
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise BertError(f"{path}: missing (a BERT folder needs {CONFIG} and "
                            f"{WEIGHTS})") from None
        except (OSError, ValueError) as e:
            raise BertError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BertError(f"{path}: not a JSON object")
        if raw.get("model_type") != "bert":
            raise BertError(f"{path}: model_type {raw.get('model_type')!r} is not BERT; "
                            "scratch.bert reads BERT folders only (model_type 'bert')")
        for key, bad in (("position_embedding_type", lambda v: v not in (None, "absolute")),
                         ("is_decoder", bool), ("add_cross_attention", bool)):
            if bad(raw.get(key)):
                raise BertError(f"{path}: {key}={raw[key]!r} is not supported (a plain BERT "
                                "encoder: absolute positions, no decoder, no cross-attention)")
        kw = {}
        for f in fields(cls):
            if f.name in raw:
                kw[f.name] = raw[f.name]
            elif f.default is MISSING:                  # no default: required
                raise BertError(f"{path}: no {f.name!r}")
        cfg = cls(**kw)
        cfg._check(path)
        return cfg

    def _check(self, path):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BertError(f"{path}: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise BertError(f"{path}: hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise BertError(f"{path}: unknown hidden_act {self.hidden_act!r} "
                            f"(known: {', '.join(ACTIVATIONS)})")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise BertError(f"{path}: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")


def expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
    """Every tensor the encoder reads, by its name in a ``BertModel`` checkpoint, and shape."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, H),
              "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
              "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, H),
              "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
    for l in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{l}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes |= {p + name + ".weight": (H, H), p + name + ".bias": (H,)}
        shapes |= {p + "intermediate.dense.weight": (I, H), p + "intermediate.dense.bias": (I,),
                   p + "output.dense.weight": (H, I), p + "output.dense.bias": (H,)}
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {p + ln + ".weight": (H,), p + ln + ".bias": (H,)}
    return shapes


def _canonical(name: str) -> str:
    """Checkpoint name -> ``BertModel`` name: drop a ``bert.`` prefix (BertForMaskedLM and the
    original bert-base-uncased), LayerNorm ``gamma``/``beta`` -> ``weight``/``bias``."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def read_weights(folder: Path, cfg: BertConfig) -> dict[str, np.ndarray]:
    """The tensors of :func:`expected_shapes` from ``model.safetensors`` (only those are read),
    each checked for presence, shape, a float dtype and finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise BertError(f"{path}: missing (scratch.bert reads safetensors only; a "
                        "pytorch_model.bin would need torch to open)")
    want = expected_shapes(cfg)
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            stored = {_canonical(k): k for k in f.keys()}
            for name, shape in want.items():
                if name not in stored:
                    raise BertError(f"{path}: tensor {name!r} is missing")
                sl = f.get_slice(stored[name])
                if tuple(sl.get_shape()) != shape:
                    raise BertError(f"{path}: tensor {name!r} has shape "
                                    f"{tuple(sl.get_shape())}, expected {shape} from {CONFIG}")
                if sl.get_dtype() not in ("F16", "F32", "F64"):
                    raise BertError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()} "
                                    "(NumPy reads F16, F32, F64)")
                out[name] = f.get_tensor(stored[name])
    except (SafetensorError, OSError) as e:
        raise BertError(f"{path}: not a readable safetensors file ({e})") from None
    for name, a in out.items():
        if not np.isfinite(a).all():
            raise BertError(f"{path}: tensor {name!r} contains NaN or inf")
    return out
