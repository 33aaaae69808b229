"""scratch/ never imports torch: every scratch module imported, and the head trained one step,
checkpointed and reloaded, in a fresh interpreter where importing torch raises."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
import importlib, pkgutil, sys, tempfile

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("scratch imported torch")
sys.meta_path.insert(0, NoTorch())

import numpy as np
import scratch
modules = [m.name for m in pkgutil.walk_packages(scratch.__path__, "scratch.")]
assert "scratch.pipeline.train" in modules, modules      # the walk reaches the subpackages
for name in modules:
    importlib.import_module(name)
from scratch.pipeline.checkpoint import load_head, load_state, save_state, save_weights
from scratch.optim import Adam
from scratch.sentiment import SentimentHead

head = SentimentHead(4, 3, seed=0)
opt = Adam(head.params)
x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
loss, grads, _ = head.loss_and_grads(x, [5, 3], [1, 0])
opt.step(grads)
folder = tempfile.mkdtemp()
save_weights(folder, head, {"encoder": "minilm"})
save_state(folder, {"optimizer": opt.state_dict(), "rng": head.rng_state()})
back, _ = load_head(folder)
load_state(folder)
assert np.array_equal(back.params["out.weight"], head.params["out.weight"])
assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules)
print("ok", len(modules))
"""


def test_scratch_runs_without_torch():
    r = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")
