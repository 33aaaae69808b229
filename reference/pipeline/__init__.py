"""The reference IMDB application in torch + transformers: the assignment's part 4 as a course
would run it, and the yardstick :mod:`scratch.pipeline` is held to.

    data, encoders, install   reviews, encoder folders (MiniLM packaged, MPNet installed)
    features                  frozen-encoder token features, cached (torchrun shards the work)
    train, predict            the BiGRU head (``reference.model``), best-validation checkpoint
    checkpoint, cli           checkpoint folders, argument checks, one-line errors
    distributed               torchrun: process groups, ranks, collectives with time-outs
    demo                      the IMDB part of ``make demo``
    attention_swap, distill   Problem 3 inside the encoder: linear attentions swapped in

It imports the torch mirrors in :mod:`reference` and the torch-free pipeline in
:mod:`scratch.pipeline`; nothing in :mod:`reference`'s mirrors imports it.
"""
