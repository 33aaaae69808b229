"""scratch.pipeline.checkpoint: the reference checkpoint format both ways, without torch on the
scratch side; damaged checkpoints refused with a one-line CheckpointError; the resume state.
Loading, saving and resuming run on each backend (``xp``; with CuPy the reference runs on
CUDA)."""
import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from reference.model import GRUHead
from reference.pipeline import checkpoint as ref_ckpt
from scratch.backend import to_numpy
from scratch.optim import Adam
from scratch.pipeline import checkpoint as ckpt
from scratch.sentiment import SentimentHead

from .helpers import on

MODEL = {"emb_dim": 6, "hidden_dim": 5, "output_dim": 1, "n_layers": 2, "bidirectional": True,
         "dropout": 0.25}


def run_config(model=MODEL):
    """A config as reference.pipeline.train writes it."""
    return {"encoder": "minilm", "encoder_source": "test", "max_length": 64, "limit_train": None,
            "limit_test": None, "seed": 3407, "batch_size": 4, "lr": 1e-3, "model": dict(model)}


def data(seed=0, B=5, T=7, E=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    x = rng.standard_normal((B, T, E)).astype(np.float32)
    x[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return x, lengths, rng.integers(0, 2, B).astype(np.float32)


def reference_trained(steps=3):
    """A GRUHead initialised by torch and trained a few Adam steps (weights away from init)."""
    torch.manual_seed(0)
    ref = GRUHead(**MODEL)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for s in range(steps):
        x, L, y = data(s)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            ref(torch.from_numpy(x), torch.from_numpy(L)).squeeze(1), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref.eval()


def scratch_trained(steps=3, xp=np):
    head = SentimentHead(**MODEL, seed=1, xp=xp)
    opt = Adam(head.params, lr=1e-2)
    for s in range(steps):
        x, L, y = data(s)
        opt.step(head.loss_and_grads(on(xp, x), L, on(xp, y))[1])
    return head


def test_reference_checkpoint_loads_into_scratch_with_the_same_logits(tmp_path, xp, device):
    ref = reference_trained()
    ref_ckpt.write_json(tmp_path / ref_ckpt.CONFIG, run_config())
    ref_ckpt.save_weights(tmp_path, ref)
    head, config = ckpt.load_head(tmp_path, xp=xp)
    assert config["encoder"] == "minilm" and config["model"] == MODEL
    x, L, _ = data(9)
    with torch.no_grad():
        want = to_numpy(ref.to(device)(torch.from_numpy(x).to(device), torch.from_numpy(L)))
    got = to_numpy(head(on(xp, x), L))
    # float32 both sides, same weights: the GRU tests' float32 bound (1e-5 of the scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))
    for n, t in ref.state_dict().items():                  # bit for bit
        np.testing.assert_array_equal(to_numpy(head.params[n]), to_numpy(t))


def test_scratch_checkpoint_loads_into_the_reference_with_the_same_logits(tmp_path, xp, device):
    head = scratch_trained(xp=xp)
    written = ckpt.save_weights(tmp_path, head, run_config())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == written and cfg["model"] == MODEL and cfg["encoder"] == "minilm"
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert cfg["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    ref, _ = ref_ckpt.load_head(tmp_path, device)
    x, L, _ = data(9)
    with torch.no_grad():
        want = to_numpy(ref(torch.from_numpy(x).to(device), torch.from_numpy(L)))
    np.testing.assert_allclose(to_numpy(head(on(xp, x), L)), want, rtol=0,
                               atol=1e-5 * max(1, np.abs(want).max()))
    for n, t in ref.state_dict().items():
        np.testing.assert_array_equal(to_numpy(t), to_numpy(head.params[n]))


def test_round_trip_and_float64_head_saved_in_the_float32_format(tmp_path):
    head = SentimentHead(**MODEL, dtype="float64", seed=4)
    ckpt.save_weights(tmp_path, head)
    back, cfg = ckpt.load_head(tmp_path, dtype="float64")
    assert set(cfg) == {"model", "weights_sha256"}
    for n, p in head.params.items():
        np.testing.assert_array_equal(back.params[n], p.astype(np.float32).astype(np.float64))
    again, _ = ckpt.load_head(tmp_path)                   # float32 head
    assert again.params["out.weight"].dtype == np.float32
    ckpt.save_weights(tmp_path, again)                    # config kept, checksum renewed
    assert json.loads((tmp_path / "config.json").read_text())["model"] == MODEL


def test_checksum_required_on_request(tmp_path):
    ckpt.save_weights(tmp_path, SentimentHead(**MODEL, seed=0))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["weights_sha256"]
    ref_ckpt.write_json(tmp_path / "config.json", cfg)
    ckpt.load_head(tmp_path)                              # verified when present
    with pytest.raises(ckpt.CheckpointError, match="weights_sha256"):
        ckpt.load_head(tmp_path, require_checksum=True)


# --- damaged checkpoints ----------------------------------------------------------------------

def header_bytes(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def rehash(folder):
    """Make config's checksum match the (damaged) weights, so another check must catch them."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(cfg))


def flip_last_byte(f):
    b = bytearray((f / "model.safetensors").read_bytes())
    b[-1] ^= 0x40
    (f / "model.safetensors").write_bytes(bytes(b))


def truncate(f, rehashed):
    (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-10])
    if rehashed:
        rehash(f)


def garble_header(f):
    b = bytearray((f / "model.safetensors").read_bytes())
    b[10:20] = b"@@@@@@@@@@"
    (f / "model.safetensors").write_bytes(bytes(b))
    rehash(f)


def put_nan(f):
    data = (f / "model.safetensors").read_bytes()
    n, header = header_bytes(data)
    start = 8 + n + header["out.bias"]["data_offsets"][0]
    b = bytearray(data)
    b[start:start + 4] = struct.pack("<f", float("nan"))
    (f / "model.safetensors").write_bytes(bytes(b))
    rehash(f)


def edit_config(**changes):
    def edit(f):
        cfg = json.loads((f / "config.json").read_text())
        for k, v in changes.items():
            if k == "model":
                cfg["model"].update(v)
            elif v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (f / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop_arg(f):
    cfg = json.loads((f / "config.json").read_text())
    del cfg["model"]["hidden_dim"]
    (f / "config.json").write_text(json.dumps(cfg))


def swap_weights_for(model):
    def swap(f):
        ckpt.save_weights(f, SentimentHead(**model, seed=0))       # another head's weights...
        edit_config(model=MODEL)(f)                                 # ...under this config
    return swap


DAMAGE = {
    "flipped byte": (flip_last_byte, "sha256 .* is not the weights_sha256"),
    "truncated": (lambda f: truncate(f, False), "sha256"),
    "truncated, checksum matching": (lambda f: truncate(f, True), "not a valid safetensors file"),
    "garbled header": (garble_header, "not a valid safetensors file"),
    "NaN weight": (put_nan, "out.bias holds 1 NaN or infinite values"),
    "bad JSON": (lambda f: (f / "config.json").write_text("{\"model\": "), "not valid JSON"),
    "JSON list": (lambda f: (f / "config.json").write_text("[1]"), "not a JSON object"),
    "missing argument": (_drop_arg, r"model arguments \['hidden_dim'\] missing"),
    "bad argument": (edit_config(model={"n_layers": 0}), "n_layers=0 is not valid"),
    "bad checksum text": (edit_config(weights_sha256="xyz"), "no valid weights_sha256"),
    "shape mismatch": (swap_weights_for(dict(MODEL, hidden_dim=4)), "shape"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "no config": (lambda f: (f / "config.json").unlink(), "no config.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    ckpt.save_weights(tmp_path, scratch_trained(1), run_config())
    ckpt.load_head(tmp_path)                                        # fine before the damage
    hurt, msg = DAMAGE[damage]
    hurt(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=msg) as e:
        ckpt.load_head(tmp_path)
    assert "\n" not in str(e.value) and (str(tmp_path) in str(e.value))


def test_missing_folder(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory"):
        ckpt.load_head(tmp_path / "nope")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    from scratch.pipeline import atomic
    path = tmp_path / "f.txt"
    atomic.atomic_write(path, b"old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# --- resume state -----------------------------------------------------------------------------

def test_resume_state_round_trip_continues_the_same_trajectory(tmp_path, xp):
    """Train 2 steps, save head + Adam + RNG state, train 2 more; a fresh head and Adam loaded
    from the saved state and trained on the same 2 batches end bit for bit equal."""
    head = scratch_trained(0, xp)
    opt = Adam(head.params, lr=1e-2)

    def batch(s):
        x, L, y = data(s)
        return on(xp, x), L, on(xp, y)

    for s in range(2):
        opt.step(head.loss_and_grads(*batch(s))[1])
    ckpt.save_state(tmp_path, {"model": head.state_dict(), "optimizer": opt.state_dict(),
                               "rng": head.rng_state(), "epoch": 2, "history": [{"loss": 0.5}]})
    for s in range(2, 4):
        opt.step(head.loss_and_grads(*batch(s))[1])
    state = ckpt.load_state(tmp_path)
    assert state["epoch"] == 2 and state["history"] == [{"loss": 0.5}]
    other = SentimentHead(**MODEL, seed=99, xp=xp)
    other.load_state_dict(state["model"])
    other.set_rng_state(state["rng"])
    opt2 = Adam(other.params)
    opt2.load_state_dict(state["optimizer"])
    for s in range(2, 4):
        opt2.step(other.loss_and_grads(*batch(s))[1])
    for n, p in head.params.items():
        np.testing.assert_array_equal(to_numpy(other.params[n]), to_numpy(p))


def test_damaged_resume_state_is_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nothing to resume"):
        ckpt.load_state(tmp_path)
    ckpt.save_state(tmp_path, {"w": np.arange(4.0)})
    path = tmp_path / ckpt.STATE
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="do not match their sha256"):
        ckpt.load_state(tmp_path)
    path.write_bytes(good[:20])
    with pytest.raises(ckpt.CheckpointError, match="unreadable resume state"):
        ckpt.load_state(tmp_path)
