"""Integrated gradients: the scratch head's own backward (scratch.explain) against Captum
(reference.pipeline.explain) in float64, completeness, padding, the words and marks
predict --explain prints, and the --html page (parsed; opened in a headless browser where
one is installed)."""
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from reference.model import GRUHead
from reference.pipeline import explain as rexplain
from reference.pipeline import predict as rpredict
from scratch.explain import gauss_legendre, integrated_gradients, token_attributions
from scratch.pipeline import explain as sexplain
from scratch.pipeline import predict as spredict
from scratch.sentiment import SentimentHead
from tests.imdb_fixtures import save_tiny_checkpoint, save_tiny_encoder

CONFIG = dict(emb_dim=6, hidden_dim=5, output_dim=1, n_layers=2, bidirectional=True,
              dropout=0.25)
LENGTHS = [9, 5, 2]


def heads(seed=0):
    torch.manual_seed(seed)
    ref = GRUHead(**CONFIG).double().eval()
    mine = SentimentHead(**CONFIG, dtype="float64")
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def batch(seed=1, scale=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, (len(LENGTHS), max(LENGTHS), CONFIG["emb_dim"]))
    for b, n in enumerate(LENGTHS):
        x[b, n:] = 0                                    # zero padding, as the feature store's
    return x, np.array(LENGTHS)


def test_gauss_legendre_is_captums():
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes, alphas = approximation_parameters("gausslegendre")
    a, w = gauss_legendre(50)
    np.testing.assert_array_equal(a, alphas(50))
    np.testing.assert_array_equal(w, step_sizes(50))
    assert w.sum() == pytest.approx(1, abs=1e-14)
    # what Captum multiplies by: torch.tensor(step_sizes).float()
    np.testing.assert_array_equal(gauss_legendre(50, captum_weights=True)[1],
                                  torch.tensor(step_sizes(50)).float().double().numpy())


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_scratch_equals_captum_in_float64(steps):
    ref, mine = heads()
    x, lengths = batch()
    attr, delta = rexplain.integrated_gradients(ref, torch.from_numpy(x),
                                                torch.from_numpy(lengths), steps)
    a_mine, logit, base = integrated_gradients(mine, x, lengths, steps, batch_tokens=40,
                                               captum_weights=True)
    err = np.abs(a_mine - attr.numpy()).max() / np.abs(attr.numpy()).max()
    assert err <= 1e-9, err
    # with exact float64 weights: Captum's float32 step sizes are the whole difference
    exact, _, _ = integrated_gradients(mine, x, lengths, steps)
    assert np.abs(exact - attr.numpy()).max() / np.abs(attr.numpy()).max() <= 1e-7
    with torch.no_grad():
        np.testing.assert_allclose(logit, ref(torch.from_numpy(x), torch.from_numpy(lengths))[:, 0],
                                   rtol=1e-12)
    np.testing.assert_allclose(a_mine.sum(axis=(1, 2)) - (logit - base), delta.numpy(),
                               atol=1e-12)


def test_completeness_within_the_stated_error():
    """The sum of attributions is logit(x) - logit(0) up to the quadrature's error: under
    1e-6 of the difference at 50 Gauss-Legendre steps (the stated error), and falling with
    the steps."""
    _, mine = heads(3)
    x, lengths = batch(4, scale=3.0)
    errors = []
    for steps in (5, 20, 50):
        scores, logit, base = token_attributions(mine, x, lengths, steps)
        errors.append(np.abs(scores.sum(axis=1) - (logit - base)) / np.abs(logit - base))
    assert (errors[2] <= 1e-6).all(), errors[2]
    assert errors[2].max() < errors[0].max()


def test_padding_gets_exactly_zero_and_the_batch_does_not_matter():
    _, mine = heads()
    x, lengths = batch()
    scores, _, _ = token_attributions(mine, x, lengths, 20)
    for b, n in enumerate(LENGTHS):
        assert (scores[b, n:] == 0).all()
        alone, _, _ = token_attributions(mine, x[b:b + 1, :n], lengths[b:b + 1], 20)
        np.testing.assert_allclose(scores[b, :n], alone[0], rtol=1e-12, atol=1e-15)
    ref, _ = heads()
    attr, _ = rexplain.integrated_gradients(ref, torch.from_numpy(x), torch.from_numpy(lengths),
                                            20)
    for b, n in enumerate(LENGTHS):
        assert (attr[b, n:] == 0).all()


def test_input_gradient_is_the_autograd_gradient():
    ref, mine = heads()
    x, lengths = batch()
    xt = torch.from_numpy(x).requires_grad_(True)
    ref(xt, torch.from_numpy(lengths))[:, 0].sum().backward()
    logits, grad = mine.input_gradient(x, lengths)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert mine.d_features is None and mine._cache is None


def test_words_marks_and_completeness_line():
    tokens = ["[CLS]", "a", "mar", "##vel", "##lous", "film", ",", "not", "boring", "!", "[SEP]"]
    scores = np.array([0.1, 0.01, 0.5, 0.2, 0.1, 0.05, 0.0, -0.3, -0.6, 0.02, -0.05])
    e = sexplain.Explanation("A marvellous film, not boring!", tokens, scores, 0.7,
                             1.0, 1.0 - scores.sum() + 1e-7, 50)
    words = e.words()
    assert [w for w, _, _ in words] == ["[CLS]", "a", "marvellous", "film", ",", "not",
                                        "boring", "!", "[SEP]"]
    assert words[2][1] == pytest.approx(0.8)
    assert e.marked() == "a [+marvellous] [+film], [-not] [-boring][+!]"
    block = e.text_block()
    assert "towards positive: marvellous +0.800, film +0.050, ! +0.020" in block
    assert "towards negative: boring -0.600, not -0.300" in block
    assert "special tokens: [CLS] +0.100, [SEP] -0.050" in block
    assert "error 1.0e-07 (50 gausslegendre steps)" in block


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.spans, self.reviews, self.urls = [], [], 0, []
        self._in_word = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "div" and a.get("class") == "review":
            self.reviews += 1
        if tag == "span" and "w" in (a.get("class") or "").split():
            self._in_word = [a["style"], float(a["title"]), ""]

    def handle_data(self, data):
        if self._in_word is not None:
            self._in_word[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._in_word is not None:
            self.spans.append(tuple(self._in_word))
            self._in_word = None


def explanations():
    tokens = ["[CLS]", "great", "<b>", "&", "dull", "[SEP]"]
    return [sexplain.Explanation("great <b> & dull", tokens, np.array([0, 2.0, 0.1, 0, -1.0, 0]),
                                 0.8, 1.2, 0.1, 50, ["bad", "good"]),
            sexplain.Explanation("dull", ["[CLS]", "dull", "[SEP]"], np.array([0, -1.5, 0.1]),
                                 0.2, -1.0, 0.4, 50, ["bad", "good"])]


def test_html_page_is_self_contained_and_coloured(tmp_path):
    path = sexplain.write_html(tmp_path / "why.html", explanations())
    text = path.read_text(encoding="utf-8")
    p = Page()
    p.feed(text)
    assert p.reviews == 2 and "script" not in p.tags and "link" not in p.tags and not p.urls
    assert "http" not in text and "@import" not in text and "url(" not in text
    words = [(w, v) for _, v, w in p.spans]
    assert words[:6] == [("[CLS]", 0), ("great", 2.0), ("<b>", 0.1), ("&", 0), ("dull", -1.0),
                         ("[SEP]", 0)]
    styles = {w: s for s, _, w in p.spans[:6]}
    assert "rgba(0, 160, 60, 1.000)" in styles["great"]       # strongest: full colour
    assert "rgba(220, 40, 40, 0.500)" in styles["dull"]
    assert "P(good) = 0.8000" in text and "P(bad) = 0.2000" in text
    assert '&rarr; <span class="label">good</span>' in text


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def test_html_page_opens_in_a_headless_browser(tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)})")
    path = sexplain.write_html(tmp_path / "why.html", explanations())
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr
    assert dom.stdout.count('class="review"') == 2 and "great" in dom.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    enc = save_tiny_encoder(root / "tiny-bert")
    return save_tiny_checkpoint(root / "ckpt", enc)


REVIEWS = ["An unbelievably wonderful film, I loved it.", "Dull and boring, a waste."]


def test_predict_explain_both_sides_agree(checkpoint, tmp_path, capsys):
    """--explain on both sides on one checkpoint: the same words, the same attributions to
    the float32 of the two encoders, a completeness line each; --html writes the page."""
    outs = []
    for main, html_path in ((spredict.main, tmp_path / "s.html"),
                            (rpredict.main, tmp_path / "r.html")):
        assert main(["--checkpoint", str(checkpoint), "--explain", "--steps", "20",
                     "--html", str(html_path), *REVIEWS]) == 0
        outs.append(capsys.readouterr().out)
        p = Page()
        p.feed(html_path.read_text(encoding="utf-8"))
        assert p.reviews == 2 and not p.urls
    for out in outs:
        assert out.count("completeness: sum of attributions") == 2
        assert "unbelievably" in out and out.count("(20 gausslegendre steps)") == 2
    mine, ref = ([float(line.split()[0]) for line in out.splitlines() if line[:1].isdigit()]
                 for out in outs)
    assert mine == pytest.approx(ref, abs=2e-4)


def test_explain_reviews_scratch_and_reference_numbers(checkpoint):
    model, tok, config = rpredict.load_model(checkpoint)
    enc, stok, head, _ = spredict.load_model(checkpoint, "float64")
    probs = spredict.predict_batch(enc, stok, head, REVIEWS, config["max_length"])
    a = sexplain.explain_reviews(enc, stok, head, REVIEWS, probs, config["max_length"], 30)
    ids = [rpredict.token_ids(tok, s, config["max_length"]) for s in REVIEWS]
    b = rexplain.explain_reviews(model, tok, REVIEWS, probs, ids, 30)
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-4 * np.abs(y.scores).max())
        assert abs(x.delta) < 1e-9 and abs(y.delta) < 1e-4
