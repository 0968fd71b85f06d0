"""Max |moejax - transformers| float32 logits per tiny variant of tests/hf_models.py, for the tree at $ROOT
(default: this checkout). Run from anywhere: ROOT=/path/to/tree python parity_check.py"""

import os
import sys
import tempfile

import jax

jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, os.environ.get("ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "../../.."))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import moejax  # noqa: E402
from tests import hf_models  # noqa: E402

print("moejax from", moejax.__file__, "kernels from", moejax.kernels.__file__)
for name in sorted(hf_models.VARIANTS):
    with tempfile.TemporaryDirectory() as directory:
        hf = hf_models.save(name, directory)
        model = moejax.load_pretrained(directory)
        tokens = np.random.RandomState(0).randint(0, 96, size=(2, 17))
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        out = np.asarray(model(jnp.asarray(tokens)))
        print(f"{name:40s} max|diff| {np.abs(out - ref).max():.2e}")
