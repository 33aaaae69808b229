"""``torchrun ... -m tests.dist_crash features|train ARGS``:
``python -m reference.pipeline.features`` or ``reference.pipeline.train`` with ARGS, except that
rank ``$CRASH_RANK`` (default 1) dies in the middle, as a worker killed by the kernel would
(``os._exit(3)``: no clean-up, no message): in its first encoder batch (features) or its first
training batch (train).  With ``CRASH_MODE=hang`` it
sleeps there instead, alive but silent.  With ``CRASH_MODE=after-save`` (train) rank 0 dies
right after it saved the state of an epoch's first batches (``--save-every``), as a job killed
mid-epoch.  For tests/test_distributed.py."""
from __future__ import annotations

import os
import sys
import time

from reference.pipeline import checkpoint as ckpt
from reference.pipeline import cli, train
from reference.pipeline import features as Fe


def _dies(real):
    def wrapper(*args, **kwargs):
        if os.environ["RANK"] == os.environ.get("CRASH_RANK", "1"):
            if os.environ.get("CRASH_MODE") == "hang":
                time.sleep(3600)                       # alive, but never answers
            os._exit(3)
        return real(*args, **kwargs)
    return wrapper


def main() -> int:
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "features":
        Fe._encode = _dies(Fe._encode)
        return cli.run(lambda: Fe.main(argv), "python -m reference.pipeline.features")
    if os.environ.get("CRASH_MODE") == "after-save":
        real_save = ckpt.save_state

        def save_state(folder, state):
            real_save(folder, state)
            if state.get("partial"):
                os._exit(3)

        ckpt.save_state = save_state
        return cli.run(lambda: train.main(argv), "python -m reference.pipeline.train")
    real_epoch = train.run_epoch

    def run_epoch(head, split, batch_size, optimizer=None, *args, **kwargs):
        if optimizer is not None:
            split.store.batch = _dies(split.store.batch)
        return real_epoch(head, split, batch_size, optimizer, *args, **kwargs)

    train.run_epoch = run_epoch
    return cli.run(lambda: train.main(argv), "python -m reference.pipeline.train")


if __name__ == "__main__":
    raise SystemExit(main())
