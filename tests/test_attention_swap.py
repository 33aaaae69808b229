"""Problem 3 inside the encoder (issue 13): the swapped scratch encoder equals the torch mirror on
real reviews (a property test, float64); the distillation trains the swapped layers' query/key
projections only and lowers its loss; the experiment command runs end to end at a tiny size
(synthetic aclImdb, tiny random BERT) with its JSON fields, a cache entry per variant that a
second run reuses, and one-line errors; the speed bench runs; tutorial 04 shows the committed
table."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.bert_attention import swap_attention
from reference.pipeline import attention_swap as AS
from reference.pipeline.data import load_imdb, tokenize
from reference.pipeline.distill import distill, layer_mse
from reference.pipeline.encoders import Encoder, load_encoder, minilm_path
from reference.pipeline.features import encoder_fingerprint
from scratch.bert import BertEncoder
from scratch.pipeline.tokenizer import pad_batch
from tests.bert_fixtures import minilm_torch, random_bert, rel_err, torch_hidden
from tests.imdb_fixtures import make_tree, tokenizer

ROOT = Path(__file__).resolve().parents[1]


# --- scratch == the torch mirror on real reviews, as a property ---------------------------------

@pytest.fixture(scope="module")
def real_ids(imdb_path):
    """Token ids of 200 real test reviews (MiniLM's tokenizer, up to 512 tokens)."""
    texts = load_imdb(imdb_path, splits=("test",))["test"].texts[::125]
    return tokenize(load_encoder("minilm").tokenizer, texts, max_length=512)


@pytest.fixture(scope="module")
def minilm64():
    return BertEncoder.from_pretrained(minilm_path(), dtype="float64"), minilm_torch(torch.float64)


@pytest.mark.imdb
@settings(max_examples=12)
@given(picks=st.lists(st.integers(0, 199), min_size=1, max_size=3),
       max_length=st.integers(2, 160),
       variant=st.sampled_from(list(AS.VARIANTS)),
       swap=st.one_of(st.none(), st.integers(0, 6), st.sets(st.integers(0, 5))),
       eps=st.sampled_from([1e-6, 0.0, 1e-3]))
def test_swapped_scratch_encoder_equals_the_torch_mirror_on_real_reviews(
        real_ids, minilm64, picks, max_length, variant, swap, eps):
    enc, model = minilm64
    options = dict(AS.VARIANTS[variant])
    if options["attention"] == "linear":
        options["eps"] = eps
    ids, mask = pad_batch([real_ids[i][:max_length] for i in picks])     # right-padded real reviews
    swap_attention(model, swap_layers=swap, **options)
    try:
        ref = torch_hidden(model, ids, mask)
    finally:
        swap_attention(model, "softmax")
    assert rel_err(enc.with_attention(swap_layers=swap, **options)(ids, mask), ref) <= 1e-10


def test_softmax_restores_the_untouched_config_and_its_cache_key():
    enc = Encoder(random_bert(0, vocab_size=30, hidden_size=8, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=8), None, "tiny", "random")
    before = (enc.model.config.to_json_string(use_diff=False), encoder_fingerprint(enc))
    swap_attention(enc.model, "linear", swap_layers=1)
    swapped = encoder_fingerprint(enc)
    swap_attention(enc.model, "softmax")
    assert swapped != before[1]
    assert (enc.model.config.to_json_string(use_diff=False), encoder_fingerprint(enc)) == before


# --- distillation --------------------------------------------------------------------------------

def test_layer_mse_is_the_masked_mean_over_real_tokens_and_layers():
    g = torch.Generator().manual_seed(0)
    states_s = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    states_t = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layers = [0, 2]
    naive = []
    for layer in layers:
        errs = [float(((states_s[layer + 1][b, t] - states_t[layer + 1][b, t]) ** 2).mean())
                for b in range(2) for t in range(5) if mask[b, t]]
        naive.append(sum(errs) / len(errs))
    assert float(layer_mse(states_s, states_t, mask, layers)) == pytest.approx(np.mean(naive),
                                                                               rel=1e-12)


def test_distillation_trains_only_the_swapped_query_key_and_lowers_its_loss():
    teacher = random_bert(3, scale=0.3, vocab_size=50, hidden_size=8, num_hidden_layers=3,
                          num_attention_heads=2, intermediate_size=16,
                          max_position_embeddings=32)
    student = copy.deepcopy(teacher)
    swap_attention(student, "linear", swap_layers={0, 2})
    rng = np.random.default_rng(0)
    texts = [rng.integers(1, 50, rng.integers(3, 20)) for _ in range(40)]
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    report = distill(student, teacher, texts[:32], [0, 2], steps=30, batch_size=8, lr=3e-3,
                     probe=texts[32:])
    assert report["probe_loss_after"] < 0.8 * report["probe_loss_before"]
    assert report["trainable_parameters"] == 2 * 2 * (8 * 8 + 8)
    assert len(report["curve"]) == 3 and report["curve"][-1]["step"] == 30
    trained = {f"encoder.layer.{layer}.attention.self.{p}.{w}" for layer in (0, 2)
               for p in ("query", "key") for w in ("weight", "bias")}
    for k, v in student.state_dict().items():
        if k in trained:
            assert not torch.equal(v, before_s[k]), k
        else:
            assert torch.equal(v, before_s[k]), k
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in student.parameters())      # frozen again


def test_mean_cosine_is_the_mean_over_real_tokens():
    class Store:
        def __init__(self, feats, folder):
            self.feats, self.folder = feats, folder
            self.lengths = np.array([len(f) for f in feats])

        def __len__(self):
            return len(self.feats)

        def batch(self, idx):
            x = torch.zeros(len(idx), int(self.lengths[idx].max()), 3)
            for b, i in enumerate(idx):
                x[b, :self.lengths[i]] = torch.as_tensor(self.feats[i])
            return x, torch.as_tensor(self.lengths[idx])

    rng = np.random.default_rng(1)
    a = [rng.standard_normal((n, 3)).astype(np.float32) for n in (1, 4, 7)]
    b = [x + rng.standard_normal(x.shape).astype(np.float32) for x in a]
    naive = np.mean([float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
                     for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True)])
    assert AS.mean_cosine(Store(a, "a"), Store(b, "b"), batch=2) == pytest.approx(naive, rel=1e-6)
    assert AS.mean_cosine(Store(a, "a"), Store(a, "a")) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="different texts"):
        AS.mean_cosine(Store(a, "a"), Store(a[:2], "c"))


def test_auto_distils_the_rows_that_lost_more_than_the_threshold():
    from argparse import Namespace

    rows = [{"variant": "softmax", "layers": "none", "test_acc": 0.80}] + [
        {"variant": v, "layers": spec, "test_acc": acc} for v, spec, acc in [
            ("efficient-softmax", "all", 0.785), ("efficient-scaling", "all", 0.50),
            ("linear-alpha1", "all", 0.779), ("efficient-softmax", "top1", 0.80),
            ("efficient-scaling", "top1", 0.60), ("linear-alpha1", "top1", 0.81)]]
    a = Namespace(distill_steps=10, distill_layers=["all"], distill_drop=2.0,
                  variants=["efficient-softmax", "efficient-scaling", "linear-alpha1"],
                  distill_variants="auto")
    assert AS.distill_plan(a, rows) == [("efficient-scaling", "all"),
                                        ("linear-alpha1", "all")]   # 2.1 points > 2
    a.distill_layers = ["all", "top1"]
    assert AS.distill_plan(a, rows)[-1] == ("efficient-scaling", "top1")
    assert len(AS.distill_plan(a, rows)) == 3
    a.distill_variants = ["efficient-softmax"]
    assert AS.distill_plan(a, rows) == [("efficient-softmax", "all"),
                                        ("efficient-softmax", "top1")]
    a.distill_steps = 0
    assert AS.distill_plan(a, rows) == []


# --- the command, tiny ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A synthetic aclImdb (12 reviews per class and split) and a random 2-layer BERT folder
    (weights N(0, 0.5^2), so that a swap changes its output) with the real uncased tokenizer."""
    root = tmp_path_factory.mktemp("swap")
    data = make_tree(root / "data", n_per_class=12)
    folder = root / "tiny-bert"            # weights N(0, 0.5^2): attention far from uniform
    random_bert(0, vocab_size=30_522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return root, data, folder


def tiny_args(root, data, folder, results="r.json"):
    return ["--data", str(data), "--encoder", str(folder), "--limit-train", "24",
            "--limit-test", "24", "--max-length", "16", "--epochs", "1", "--batch-size", "8",
            "--variants", "efficient-softmax,linear-alpha0.1", "--layers", "all,top1",
            "--distill-steps", "6", "--distill-batch", "4", "--distill-variants",
            "linear-alpha0.1", "--precision-check", "3", "--cache", str(root / "cache"),
            "--out", str(root / "runs"), "--results", str(root / results), "--no-progress"]


@pytest.mark.slow
def test_experiment_runs_caches_by_variant_and_reuses_everything(tiny_setup, capsys):
    root, data, folder = tiny_setup
    assert AS.main(tiny_args(root, data, folder)) == 0
    res = json.loads((root / "r.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["softmax", "efficient-softmax all", "linear-alpha0.1 all",
                     "efficient-softmax top1", "linear-alpha0.1 top1",
                     "linear-alpha0.1 all distilled"]
    assert res["n_train"] + res["n_valid"] == 24 and res["n_test"] == 24
    for r in res["rows"]:
        assert 0 <= r["test_acc"] <= 1 and np.isfinite(r["test_loss"])
        assert -1 <= r["cos_to_softmax"] <= 1 + 1e-6
        assert r["features"]["train"]["tokens"] > 0 and r["feature_seconds"] >= 0
        assert not any(t["cached"] for t in r["features"].values())
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["softmax"]["cos_to_softmax"] == pytest.approx(1.0, abs=1e-6)
    assert rows["linear-alpha0.1 top1"]["swapped_layers"] == [1]
    assert rows["linear-alpha0.1 all"]["swapped_layers"] == [0, 1]
    assert all(r["cos_to_softmax"] < 0.9999 for n, r in rows.items() if n != "softmax")
    for part in ("train", "test"):             # one cache entry per variant (the synthetic
        entries = [r["features"][part]["entry"] for r in res["rows"]]  # splits share texts)
        assert len(set(entries)) == len(entries)
    d = rows["linear-alpha0.1 all distilled"]["distill"]
    assert d["steps"] == 6 and d["texts"] == res["n_train"] and not d["cached"]
    assert not res["autocast_bf16"] \
        or set(res["precision_check"]) == {"softmax", "efficient-softmax", "linear-alpha0.1"}
    md = (root / "r.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(names) and "| linear-alpha0.1 | all | yes |" in md[-1]

    # a second run: every feature entry and the distilled projections come from the cache
    assert AS.main(tiny_args(root, data, folder, "r2.json")) == 0
    again = json.loads((root / "r2.json").read_text())
    for r, r2 in zip(res["rows"], again["rows"], strict=True):
        assert all(t["cached"] for t in r2["features"].values()), r2["name"]
        assert [r2["features"][p]["entry"] for p in ("train", "test")] == \
               [r["features"][p]["entry"] for p in ("train", "test")]
        assert r2["test_acc"] == r["test_acc"] and r2["cos_to_softmax"] == r["cos_to_softmax"]
        assert r2["feature_seconds"] == r["feature_seconds"]     # as recorded when made
    assert again["rows"][-1]["distill"]["cached"]


@pytest.mark.parametrize("extra, message", [
    (["--variants", "efficient,linear"], "unknown variant efficient, linear"),
    (["--layers", "all,bottom2"], "use all or topK"),
    (["--layers", "all,top3"], "top3: tiny-bert has 2 layers"),
    (["--layers", "all", "--distill-layers", "top1"],
     "--distill-layers top1 not among --layers all"),
    (["--distill-variants", "efficient-scaling"], "not among --variants"),
    (["--limit-test", "999"], "--limit-test 999 is larger than the split"),
    (["--results", "out.txt"], "must name a .json file"),
])
def test_bad_input_is_one_line(tiny_setup, capsys, extra, message):
    root, data, folder = tiny_setup
    with pytest.raises(SystemExit) as e:
        AS.main(tiny_args(root, data, folder, "bad.json") + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (root / "bad.json").exists()


def test_help():
    r = subprocess.run([sys.executable, "-m", "reference.pipeline.attention_swap", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--distill-steps" in r.stdout and "topK" in r.stdout


# --- the speed bench and the tutorial section ---------------------------------------------------

def test_speed_bench_runs_tiled_past_512_and_writes_json_and_png(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/attention_swap_speed.py"),
                        "--lengths", "8,520", "--repeat", "1", "--variants", "linear-alpha1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "attention_swap_speed.json").read_text())
    got = {(row["variant"], row["side"], row["n"]) for row in res["rows"]}
    assert got == {(v, s, n) for v in ("softmax", "linear-alpha1") for s in ("scratch", "torch")
                   for n in (8, 520)}
    # both sides tile the position table the same way: their outputs agree past 512 too
    assert all(row["max_abs_diff"] < 1e-4 and row["cpu_seconds"] > 0 for row in res["rows"])
    assert set(res["summary"]["torch"]["linear-alpha1"]["ratio"]) == {"8", "520"}
    assert (tmp_path / "attention_swap_speed.png").stat().st_size > 5000


def test_tutorial_shows_the_committed_table():
    """Tutorial 04's section 7 prints the committed results' table (its notebook, executed by
    ``make tutorials``; tests/test_tutorials.py checks it equals its source and runs it)."""
    import nbformat

    swap = json.loads((ROOT / "results/attention_swap.json").read_text())
    assert swap["rows"][0]["variant"] == "softmax" and len(swap["rows"]) >= 2
    nb = nbformat.read(ROOT / "tutorials/04_attention.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert swap["table"] in printed, "tutorial 04 is out of date: run make tutorials"
