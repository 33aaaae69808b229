"""``predict --explain`` and ``--html``, torch-free: per-token attributions (integrated gradients
over the head's input, :mod:`scratch.explain` here, Captum in :mod:`reference.pipeline.explain`)
turned into words, a marked review and a self-contained HTML page.

* words: word pieces (``##ing``) are joined back onto their word and their attributions added;
  the encoder's special tokens (``[CLS]``, ``[SEP]``, MPNet's ``<s>``, ``</s>``) are kept apart;
* the marked review: the :data:`TOP` words with the strongest positive attribution as
  ``[+word]``, the strongest negative as ``[-word]``, then the completeness check: the sum of
  every token's attribution (specials included) against ``logit(x) - logit(baseline)``;
* :func:`write_html`: one page, inline CSS only (no script, no network), each word coloured by
  its attribution (green towards the positive label, red towards the negative), with the
  probabilities.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..explain import METHOD
from .atomic import atomic_write

SPECIALS = frozenset({"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>"})
TOP = 3
NO_SPACE_BEFORE = set(".,!?;:%)]}'\"")
NO_SPACE_AFTER = set("([{'\"$#")


@dataclass
class Explanation:
    """One review's attributions: ``scores[i]`` is token ``tokens[i]``'s (summed over the
    hidden dimension); ``logit`` and ``baseline_logit`` are the head's at the review's
    features and at the baseline (zeros)."""
    text: str
    tokens: list[str]
    scores: np.ndarray
    prob: float
    logit: float
    baseline_logit: float
    steps: int
    labels: list[str] | None = None

    @property
    def total(self) -> float:
        return float(np.sum(self.scores))

    @property
    def delta(self) -> float:
        """Completeness error: sum of attributions - (logit(x) - logit(baseline))."""
        return self.total - (self.logit - self.baseline_logit)

    @property
    def names(self) -> list[str]:
        return list(self.labels) if self.labels else ["negative", "positive"]

    @property
    def label(self) -> str:
        return self.names[int(self.prob > 0.5)]

    def words(self) -> list[tuple[str, float, bool]]:
        """(word, attribution, is_special) in order: word pieces joined to their word."""
        return join_pieces(self.tokens, self.scores)

    def marked(self, top: int = TOP) -> str:
        """The review's words, the ``top`` strongest positive ones as ``[+word]`` and negative
        ones as ``[-word]``."""
        words = [(w, s) for w, s, special in self.words() if not special]
        pos = [i for i in np.argsort([-s for _, s in words], kind="stable")[:top]
               if words[i][1] > 0]
        neg = [i for i in np.argsort([s for _, s in words], kind="stable")[:top]
               if words[i][1] < 0]
        shown = [f"[+{w}]" if i in pos else f"[-{w}]" if i in neg else w
                 for i, (w, _) in enumerate(words)]
        return detokenize(shown, [w for w, _ in words])

    def strongest(self, top: int = TOP) -> tuple[list, list]:
        words = [(w, s) for w, s, special in self.words() if not special]
        pos = sorted((x for x in words if x[1] > 0), key=lambda x: -x[1])[:top]
        neg = sorted((x for x in words if x[1] < 0), key=lambda x: x[1])[:top]
        return pos, neg

    def completeness(self) -> str:
        d = self.logit - self.baseline_logit
        return (f"completeness: sum of attributions {self.total:+.6f} vs logit(x) - "
                f"logit(0) = {self.logit:+.6f} - {self.baseline_logit:+.6f} = {d:+.6f}: "
                f"error {abs(self.delta):.1e} ({self.steps} {METHOD} steps)")

    def text_block(self, top: int = TOP) -> str:
        """What ``predict --explain`` prints under the review's line."""
        pos, neg = self.strongest(top)
        fmt = lambda xs: ", ".join(f"{w} {s:+.3f}" for w, s in xs) or "none"  # noqa: E731
        specials = ", ".join(f"{w} {s:+.3f}" for w, s, sp in self.words() if sp)
        return "\n".join([
            f"    {self.marked(top)}",
            f"    towards {self.names[1]}: {fmt(pos)}",
            f"    towards {self.names[0]}: {fmt(neg)}",
            *([f"    special tokens: {specials}"] if specials else []),
            f"    {self.completeness()}"])


def join_pieces(tokens, scores) -> list[tuple[str, float, bool]]:
    """Word pieces -> words: a ``##piece`` joins the word before it (its attribution added)."""
    words: list[list] = []
    for token, score in zip(tokens, scores, strict=True):
        special = token in SPECIALS
        if token.startswith("##") and words and not words[-1][2]:
            words[-1][0] += token[2:]
            words[-1][1] += float(score)
        else:
            words.append([token, float(score), special])
    return [(w, s, sp) for w, s, sp in words]


def detokenize(shown: list[str], plain: list[str]) -> str:
    """Join words with spaces, none before closing punctuation or after an opening one
    (``plain[i]`` is word i without its marks)."""
    out = ""
    for i, (w, p) in enumerate(zip(shown, plain, strict=True)):
        glue = i > 0 and not (p in NO_SPACE_BEFORE or plain[i - 1] in NO_SPACE_AFTER)
        out += (" " if glue else "") + w
    return out


def explain_reviews(encoder, tokenizer, head, texts, probs, max_length: int = 512,
                    steps: int = 50, labels=None) -> list[Explanation]:
    """The scratch model's explanations: each review's features by the scratch encoder, then
    :func:`scratch.explain.token_attributions` (the head's own backward pass)."""
    from ..backend import to_numpy
    from ..explain import token_attributions
    from .tokenizer import pad_batch

    out = []
    for ids, text, prob in zip(tokenizer.encode(list(texts), max_length), texts, probs,
                               strict=True):
        input_ids, mask = pad_batch([ids], tokenizer.pad_id)
        features = encoder(input_ids, mask)                                  # (1, T, E)
        scores, logit, base = token_attributions(head, features, mask.sum(axis=1), steps)
        out.append(Explanation(text, tokenizer.tokens(ids), to_numpy(scores)[0].astype(float),
                               prob, float(to_numpy(logit)[0]), float(to_numpy(base)[0]),
                               steps, labels))
    return out


# --- the HTML page -------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.9; color: #222; }
.review { border: 1px solid #ccc; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
.head { font-weight: 600; }
.w { border-radius: 3px; padding: 0 1px; }
.special { color: #888; font-size: 85%; }
.check { color: #555; font-size: 85%; }
.legend span { padding: 0 0.4rem; border-radius: 3px; }
"""


def colour(score: float, scale: float) -> str:
    """Green (towards the second label) or red (the first), opacity |score| / scale."""
    a = 0.0 if scale <= 0 else min(1.0, abs(score) / scale)
    rgb = "0, 160, 60" if score > 0 else "220, 40, 40"
    return f"background-color: rgba({rgb}, {a:.3f})"


def review_html(e: Explanation, index: int) -> str:
    words = e.words()
    scale = max((abs(s) for _, s, _ in words), default=0.0)
    spans = []
    for w, s, special in words:
        cls = "w special" if special else "w"
        spans.append(f'<span class="{cls}" style="{colour(s, scale)}" '
                     f'title="{s:+.4f}">{html.escape(w)}</span>')
    return (f'<div class="review" id="review-{index}">\n'
            f'<div class="head">Review {index}: P({html.escape(e.names[1])}) = {e.prob:.4f}, '
            f'P({html.escape(e.names[0])}) = {1 - e.prob:.4f} &rarr; '
            f'<span class="label">{html.escape(e.label)}</span></div>\n'
            f'<p class="tokens">{detokenize(spans, [w for w, _, _ in words])}</p>\n'
            f'<div class="check">{html.escape(e.completeness())}</div>\n</div>')


def page(explanations: list[Explanation], title: str = "Why the model said so") -> str:
    names = explanations[0].names if explanations else ["negative", "positive"]
    body = "\n".join(review_html(e, i) for i, e in enumerate(explanations, 1))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            f'<p class="legend">Each word coloured by its integrated-gradients attribution to '
            f"the logit (summed over the encoder's hidden dimension, baseline zeros): "
            f'<span style="{colour(1, 1)}">towards {html.escape(names[1])}</span> '
            f'<span style="{colour(-1, 1)}">towards {html.escape(names[0])}</span>; '
            f"hover a word for its value.</p>\n{body}\n</body>\n</html>\n")


def write_html(path, explanations: list[Explanation], title: str = "Why the model said so"):
    """The page, written atomically (UTF-8)."""
    atomic_write(path, page(explanations, title).encode("utf-8"))
    return Path(path)
