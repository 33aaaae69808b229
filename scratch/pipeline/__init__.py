"""The torch-free pipeline around the maths: the machinery a model needs to meet real data.

    data        the aclImdb reviews, the seeded split, length buckets
    tokenizer   the encoder folder's ``tokenizer.json`` (HF tokenizers), padding
    encoder_names  minilm / mpnet / a folder -> the scratch encoder and its tokenizer
    features    the frozen encoder's token features, computed once, cached on disk
    ranks       many processes (torchrun ranks) writing one cache entry together
    checkpoint  the reference's checkpoint folder format, both ways, checksummed
    atomic      atomic file writes
    cli         argument checks and one-line errors shared by the commands
    train       ``python -m scratch.pipeline.train``: the head trained on cached features
    predict     ``python -m scratch.pipeline.predict``: a checkpoint scores reviews

Dependencies point one way: this package imports the maths in :mod:`scratch`, never the
other way round, and never torch.
"""
