"""Reading a Hugging Face BERT or MPNet folder without torch: ``config.json`` (checked: model
type, sizes, activation) and the tensors of ``model.safetensors`` the encoder needs (checked:
present, shapes from the config, float dtype, finite), through ``safetensors``' NumPy reader.

Names are ``BertModel``'s (``embeddings.word_embeddings.weight``, ``encoder.layer.0...``) or
``MPNetModel``'s (``encoder.layer.0.attention.attn.q.weight``, ...,
``encoder.relative_attention_bias.weight``); checkpoints that prefix them with ``bert.`` /
``mpnet.`` (``BertForMaskedLM``, the original bert-base-uncased, ``MPNetForMaskedLM``) or call
LayerNorm's parameters ``gamma``/``beta`` are read too.  Tensors the encoder does not use
(pooler, heads, ``position_ids``) are never read.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from .activations import ACTIVATIONS

CONFIG, WEIGHTS = "config.json", "model.safetensors"
MPNET_PADDING_IDX = 1     # transformers' MPNetEmbeddings.padding_idx: fixed, whatever pad_token_id
MPNET_BUCKETS = 32        # the buckets MPNetEncoder.compute_position_bias uses (its default)
MPNET_MAX_DISTANCE = 128  # relative_position_bucket's max_distance (its default)


class BertError(ValueError):
    """A BERT folder, its weights, an option or an input is not what the encoder can use
    (the message names the file, tensor, option or input and the problem)."""



@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` the forward pass needs (checked on load)."""
    model_type: ClassVar[str] = "bert"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1           # used only where layers are trained
    attention_probs_dropout_prob: float = 0.1  # (scratch.top_layers); the forward has none

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """The longest input: one learned position per token, counted from 0."""
        return self.max_position_embeddings

    @classmethod
    def from_folder(cls, folder: Path) -> BertConfig:
        """The folder's config: a :class:`BertConfig` or an :class:`MPNetConfig`, as its
        ``model_type`` says."""
        path = Path(folder) / CONFIG
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise BertError(f"{path}: missing (a BERT or MPNet folder needs {CONFIG} and "
                            f"{WEIGHTS})") from None
        except (OSError, ValueError) as e:
            raise BertError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BertError(f"{path}: not a JSON object")
        kinds = {c.model_type: c for c in (BertConfig, MPNetConfig)}
        if raw.get("model_type") not in kinds:
            raise BertError(f"{path}: model_type {raw.get('model_type')!r} is neither BERT nor "
                            "MPNet; scratch.bert reads model_type 'bert' or 'mpnet'")
        return kinds[raw["model_type"]]._from_dict(path, raw)

    @classmethod
    def _from_dict(cls, path: Path, raw: dict) -> BertConfig:
        for key, bad in (("position_embedding_type", lambda v: v not in (None, "absolute")),
                         ("is_decoder", bool), ("add_cross_attention", bool)):
            if bad(raw.get(key)):
                raise BertError(f"{path}: {key}={raw[key]!r} is not supported (a plain "
                                "encoder: its own positions, no decoder, no cross-attention)")
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
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise BertError(f"{path}: {name} must be a number in [0, 1), got {v!r}")


@dataclass(frozen=True)
class MPNetConfig(BertConfig):
    """The fields of an MPNet ``config.json`` the forward pass needs (checked on load).

    ``type_vocab_size`` is BERT's and unused (MPNet has no token types).  Positions count from
    ``MPNET_PADDING_IDX + 1``, so ``max_tokens = max_position_embeddings - 2``.  The
    relative-position table has ``relative_attention_num_buckets`` rows, but transformers'
    ``MPNetEncoder`` always buckets into ``MPNET_BUCKETS`` (32; its ``compute_position_bias``
    never passes the config's count): rows past 32 are never read, and fewer than 32 rows
    cannot be indexed (an error here, an IndexError in transformers)."""
    model_type: ClassVar[str] = "mpnet"
    max_position_embeddings: int = 512
    relative_attention_num_buckets: int = 32

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - MPNET_PADDING_IDX - 1

    def _check(self, path):
        super()._check(path)
        n = self.relative_attention_num_buckets
        if not isinstance(n, int) or isinstance(n, bool) or n < MPNET_BUCKETS:
            raise BertError(f"{path}: relative_attention_num_buckets must be an integer >= "
                            f"{MPNET_BUCKETS} (transformers' MPNet always uses {MPNET_BUCKETS} "
                            f"buckets), got {n!r}")
        if self.max_tokens < 1:
            raise BertError(f"{path}: max_position_embeddings must be >= "
                            f"{MPNET_PADDING_IDX + 2} (positions start after the pad id "
                            f"{MPNET_PADDING_IDX}), got {self.max_position_embeddings}")


# per layer: the encoder's name of each weight -> its name in the checkpoint (without .weight)
LAYER_NAMES = {
    "bert": dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                 o="attention.output.dense", ln1="attention.output.LayerNorm",
                 w1="intermediate.dense", w2="output.dense", ln2="output.LayerNorm"),
    "mpnet": dict(q="attention.attn.q", k="attention.attn.k", v="attention.attn.v",
                  o="attention.attn.o", ln1="attention.LayerNorm",
                  w1="intermediate.dense", w2="output.dense", ln2="output.LayerNorm"),
}
RELATIVE_BIAS = "encoder.relative_attention_bias.weight"     # MPNet's, shared by all layers


def layer_name(cfg: BertConfig, index: int, part: str) -> str:
    """The checkpoint name (without ``.weight``/``.bias``) of layer ``index``'s ``part`` (a key
    of :data:`LAYER_NAMES`)."""
    return f"encoder.layer.{index}.{LAYER_NAMES[cfg.model_type][part]}"


def expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
    """Every tensor the encoder reads, by its name in a ``BertModel`` / ``MPNetModel``
    checkpoint, and shape."""
    H, inner = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, H),
              "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, H),
              "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
    if cfg.model_type == "bert":
        shapes["embeddings.token_type_embeddings.weight"] = (cfg.type_vocab_size, H)
    else:
        shapes[RELATIVE_BIAS] = (cfg.relative_attention_num_buckets, cfg.num_attention_heads)
    sizes = dict(q=(H, H), k=(H, H), v=(H, H), o=(H, H), ln1=(H,), w1=(inner, H),
                 w2=(H, inner), ln2=(H,))
    for index in range(cfg.num_hidden_layers):
        for part, shape in sizes.items():
            name = layer_name(cfg, index, part)
            shapes |= {name + ".weight": shape, name + ".bias": shape[:1]}
    return shapes


def _canonical(name: str) -> str:
    """Checkpoint name -> ``BertModel``/``MPNetModel`` name: drop a ``bert.``/``mpnet.`` prefix
    (BertForMaskedLM, the original bert-base-uncased, MPNetForMaskedLM), LayerNorm
    ``gamma``/``beta`` -> ``weight``/``bias``."""
    name = name.removeprefix("bert.").removeprefix("mpnet.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def read_weights(folder: Path, cfg: BertConfig, only=None) -> dict[str, np.ndarray]:
    """The tensors of :func:`expected_shapes` (``only``: those names of them) from
    ``model.safetensors`` (only those are read), each checked for presence, shape, a float
    dtype and finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise BertError(f"{path}: missing (scratch.bert reads safetensors only; a "
                        "pytorch_model.bin would need torch to open)")
    want = expected_shapes(cfg)
    if only is not None:
        want = {name: want[name] for name in only}
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            stored = {_canonical(k): k for k in f.keys()}
            for name, shape in want.items():
                if name not in stored:
                    raise BertError(f"{path}: tensor {name!r} is missing"
                                    + _other_family(stored, cfg))
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


def read_position_table(folder: Path, cfg: BertConfig):
    """MPNet's relative position table ``E_rel`` (buckets, h) from the folder (checked as
    :func:`read_weights` checks it); None for BERT, which has none."""
    if cfg.model_type != "mpnet":
        return None
    return read_weights(folder, cfg, only=[RELATIVE_BIAS])[RELATIVE_BIAS]


def _other_family(stored, cfg: BertConfig) -> str:
    """A hint when the tensors are the other family's (a config.json with the wrong model_type)."""
    for family, names in LAYER_NAMES.items():
        if family != cfg.model_type and f"encoder.layer.0.{names['q']}.weight" in stored:
            return (f" (the tensors are {family}'s: {CONFIG} says model_type "
                    f"{cfg.model_type!r})")
    return ""
