"""Integrated gradients of the reference head with Captum: ``reference.pipeline.predict --explain``.

:func:`integrated_gradients` is Captum's ``IntegratedGradients`` over the head's input (the frozen
encoder's features), baseline zeros, ``method="gausslegendre"``: what :mod:`scratch.explain`
computes with the scratch head's own backward pass, to float64 rounding (tests/test_explain.py).
:func:`explain_reviews` runs it for each review of a predict command and hands the numbers to
the torch-free presentation (:mod:`scratch.pipeline.explain`: words from word pieces, the marked
text, the HTML page).
"""
from __future__ import annotations

import torch

from scratch.explain import METHOD
from scratch.pipeline.explain import Explanation


def integrated_gradients(head, features: torch.Tensor, lengths: torch.Tensor | None = None,
                         steps: int = 50, internal_batch_size: int | None = None):
    """(attributions (B, T, E), convergence delta (B,)) of ``head``'s first logit (a
    :class:`reference.model.GRUHead`, put in eval mode) by Captum, baseline zeros."""
    from captum.attr import IntegratedGradients

    head.eval()

    def logit(x, lengths=None):
        return head.head(x, lengths)[:, 0]

    ig = IntegratedGradients(logit)
    args = None if lengths is None else (lengths,)
    with torch.enable_grad():
        attributions, delta = ig.attribute(
            features, baselines=torch.zeros_like(features), additional_forward_args=args,
            n_steps=steps, method=METHOD, internal_batch_size=internal_batch_size,
            return_convergence_delta=True)
    return attributions.detach(), delta.detach()


def explain_reviews(model, tokenizer, texts, probs, token_ids, steps: int = 50,
                    labels=None) -> list[Explanation]:
    """One :class:`~scratch.pipeline.explain.Explanation` per review: the model's features of
    its ids ``token_ids[i]`` (:func:`reference.pipeline.predict.token_ids`), Captum's
    attributions summed over the hidden dimension, the logits at the review and at the
    baseline."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for text, prob, ids in zip(texts, probs, token_ids, strict=True):
        features, lengths = model.encode(torch.LongTensor(ids).to(device).unsqueeze(0))
        features = features.float()
        attributions, _ = integrated_gradients(model, features, lengths, steps,
                                               internal_batch_size=max(1, 16_384 // len(ids)))
        with torch.no_grad():
            ends = model.head(torch.cat([features, torch.zeros_like(features)]),
                              None if lengths is None else lengths.repeat(2))[:, 0]
        out.append(Explanation(text, tokenizer.convert_ids_to_tokens(ids),
                               attributions[0].sum(-1).double().cpu().numpy(), prob,
                               float(ends[0]), float(ends[1]), steps, labels))
    return out
