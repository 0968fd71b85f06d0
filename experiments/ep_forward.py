"""Expert-parallel forward pass of a small built-in MoE on every device of every process.

The multi-process check: ./launch.sh --processes 2 --local_devices 4 ep_forward --out=/tmp/ep.npy gives the
same logits as ./launch.sh ep_forward --local_devices 8 --out=/tmp/one.npy (one process).
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", "", "Write the logits (process 0) to this .npy file.")
_GATING = flags.DEFINE_enum("gating", "dynamic", ["dynamic", "static"], "Dispatch mode.")
_SEED = flags.DEFINE_integer("seed", 0, "Model and token seed.")


def main(argv):
    del argv
    from moejax import distributed

    distributed.initialize_from_env()
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import moejax
    from moejax import parallel

    config = moejax.ModelConfig(architecture="mixtral", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, moe_layers=(True, True), num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    model = moejax.random_model(config, seed=_SEED.value)
    mesh = parallel.make_mesh()
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
          f"mesh {dict(mesh.shape)}, gating {_GATING.value}")
    ep_model = parallel.expert_parallel(model, mesh, _GATING.value)
    tokens = np.random.default_rng(_SEED.value).integers(0, 128, size=(4, 16)).astype(np.int32)
    replicated = NamedSharding(mesh, P())
    graphdef, state = nnx.split(ep_model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t).logits, out_shardings=replicated)(
        state, parallel.global_array(tokens, replicated))
    local = np.asarray(logits.addressable_data(0))
    print(f"logits {local.shape}, checksum {float(np.abs(local).sum()):.6f}")
    if _OUT.value and jax.process_index() == 0:
        np.save(_OUT.value, local)


if __name__ == "__main__":
    app.run(main)
