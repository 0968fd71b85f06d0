"""Expert parallelism on 8 CPU host devices against the single-device reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import parallel, placement
from tests.tiny import decisive_model, expert_mesh

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(3, 10)))  # 30 tokens: padded to 32


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.fixture(scope="module")
def mesh():
    return expert_mesh()


forward = nnx.jit(lambda m, t: m.forward(t))


@pytest.mark.parametrize("options", [
    dict(gating="dynamic"),
    dict(gating="dynamic", all_to_all="padded", bucket=None),
    dict(gating="dynamic", placement=(3, 1, 4, 0, 5, 2, 7, 6)),
    dict(gating="static", capacity_fraction=2.0),  # slots for every pair: nothing dropped
])
def test_expert_parallel_equals_single_device(model, mesh, options):
    ref = model.forward(TOKENS)
    out = forward(parallel.expert_parallel(model, mesh, **options), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    for r, r_ref in zip(out.routings, ref.routings):
        assert bool(r.keep.all())


def test_data_and_expert_axes(model):
    mesh = parallel.make_mesh(expert=4, data=2)
    ref = model.forward(TOKENS)
    out = forward(parallel.expert_parallel(model, mesh), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", [moejax.MoEPolicy(capacity_factor=0.75),
                                    moejax.MoEPolicy(capacity_factor=1.0, expanded="local", num_devices=8)])
def test_capacity_policies_work_unchanged(model, mesh, policy):
    dropping = moejax.with_policy(model, policy)
    ref = dropping.forward(TOKENS)
    assert not all(bool(r.keep[:, :2].all()) for r in ref.routings)  # the policy drops something
    out = forward(parallel.expert_parallel(dropping, mesh), TOKENS)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


def test_expanded_local_on_a_data_by_expert_mesh_equals_one_device_with_the_same_layout(model):
    """On a 2 x 4 mesh a token's expert-axis device is its block index mod 4 (not block // 2): the single-
    device policy given the same layout keeps exactly what the expert-parallel model computes."""
    mesh = parallel.make_mesh(expert=4, data=2)
    policy = moejax.MoEPolicy(capacity_factor=1.0, expanded="local")
    layout = moejax.layout.Layout.build(8, 4, data=2)
    assert not np.array_equal(layout.token_devices(30), placement.token_devices(30, 4))  # data=1 would differ
    one_device = moejax.with_runtime(model, moejax.MoERuntime(policy, layout=layout))
    ref = one_device.forward(TOKENS)
    assert not all(bool(r.keep[:, :2].all()) for r in ref.routings)  # the policy drops something
    out = forward(moejax.with_policy(parallel.expert_parallel(model, mesh), policy), TOKENS)  # layout from the mesh
    for r, r_ref in zip(out.routings, ref.routings):
        np.testing.assert_array_equal(np.asarray(r.experts), np.asarray(r_ref.experts))
        np.testing.assert_array_equal(np.asarray(r.keep), np.asarray(r_ref.keep))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)


def test_a_placement_is_given_once(model, mesh):
    policy = moejax.MoEPolicy(capacity_factor=1.0, expanded="local", placement=(0, 1, 2, 3, 4, 5, 6, 7))
    with pytest.raises(ValueError, match="disagrees with the model's layout"):
        parallel.expert_parallel(moejax.with_policy(model, policy), mesh, placement=(7, 6, 5, 4, 3, 2, 1, 0))


def test_the_callers_model_is_left_as_it_was(model, mesh):
    ep = parallel.expert_parallel(model, mesh)
    assert all(b.runtime.sharded for b in ep.moe_blocks())
    assert not any(b.runtime.sharded for b in model.moe_blocks())
    assert all(b.runtime == moejax.MoERuntime() for b in model.moe_blocks())


def _fairseq_brute_force(experts, keep, capacity):
    """fairseq top-k gating: expert slots go to first choices in token order, then second choices, ..."""
    n, k = experts.shape
    used = {}
    kept = np.zeros_like(keep)
    for j in range(k):
        for t in range(n):
            if keep[t, j]:
                e = experts[t, j]
                if used.get(e, 0) < capacity:
                    kept[t, j] = True
                    used[e] = used.get(e, 0) + 1
    return kept


def test_static_gating_drops_what_fairseq_drops(model, mesh):
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, size=(4, 16)))  # 64 tokens: 8 per device
    ep = parallel.expert_parallel(model, mesh, gating="static", capacity_fraction=0.25)  # 2 slots per expert
    out = forward(ep, tokens)
    for r_ep in out.routings:  # each layer's own routing (later layers see the earlier drops)
        experts, keep = np.asarray(r_ep.experts), np.ones(r_ep.experts.shape, bool)
        expected = np.concatenate([_fairseq_brute_force(experts[d * 8:(d + 1) * 8], keep[d * 8:(d + 1) * 8], 2)
                                   for d in range(8)])
        assert expected.sum() < keep.sum()  # something is dropped
        np.testing.assert_array_equal(np.asarray(r_ep.keep), expected)
    # a static model that drops equals the single-device model with exactly those pairs removed
    block = ep.moe_blocks()[0]
    x = jnp.asarray(np.random.RandomState(2).randn(64, 32), jnp.float32)
    out_ep, r_ep, _ = nnx.jit(lambda b, x: b(x, jnp.ones(64, bool)))(block, x)
    ref_block = model.moe_blocks()[0]
    r = ref_block.route(x, jnp.ones(64, bool))._replace(keep=r_ep.keep)
    sent = moejax.dispatch.dispatch(x, r)
    from moejax.kernels import grouped_ffn
    y = grouped_ffn(sent.rows, sent.group_sizes, ref_block.w_gate[...], ref_block.w_up[...], ref_block.w_down[...])
    np.testing.assert_allclose(np.asarray(out_ep), np.asarray(moejax.dispatch.combine(y, sent, r)), atol=1e-5)


def test_bucketed_dynamic_gating_never_truncates(model, mesh):
    ep = parallel.expert_parallel(model, mesh)
    runner = parallel.ExpertParallelRunner(ep, lambda m, t: (lambda o: (o.logits, o.needed_bucket))(forward(m, t)))
    tokens = jnp.asarray(np.full((2, 16), 7))  # every token routes alike: a worst-case skew
    logits = runner(tokens, pairs_per_device=tokens.size * 2 // 8)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5, rtol=0)
    sizes = parallel.bucket_sizes(8, 8)
    # each device's 4 tokens send all 4 first choices to one device: a count of 4 against a balanced 1
    assert sizes[0] == 1 and sizes[0] in runner.compiled_buckets and len(runner.compiled_buckets) == 2
    assert runner.bucket == min(s for s in sizes if s >= 4)
    balanced = jnp.asarray(np.random.RandomState(3).randint(0, 64, size=(2, 16)))
    np.testing.assert_allclose(np.asarray(runner(balanced, pairs_per_device=8)), np.asarray(model(balanced)),
                               atol=1e-5, rtol=0)


def test_generate_on_the_mesh_matches(model, mesh):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    expected = np.asarray(moejax.generate(model, prompts, max_new_tokens=6))
    np.testing.assert_array_equal(np.asarray(moejax.generate(parallel.expert_parallel(model, mesh), prompts, 6)),
                                  expected)


def test_bad_parallel_settings(model, mesh):
    with pytest.raises(ValueError, match=r"expert axis \(3 devices\) does not divide the number of experts \(8\)"):
        parallel.expert_parallel(model, parallel.make_mesh(expert=3, devices=jax.devices()[:3]))
    with pytest.raises(ValueError, match="unknown dispatch mode .*'sparse'"):
        parallel.expert_parallel(model, mesh, gating="sparse")
    with pytest.raises(ValueError, match="data=3 does not divide the 8 devices"):
        parallel.make_mesh(data=3)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 local processes x 4 CPU devices (jax.distributed over gloo) give the logits of 1 process x 8."""
    import os
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOEJAX_VENV=sys.prefix, MOEJAX_SKIP_SETUP="1", JAX_PLATFORMS="cpu")
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    runs = {"one": ["--local_devices", "8"], "two": ["--processes", "2", "--local_devices", "4", "--port", str(port)]}
    for name, where in runs.items():
        subprocess.run([os.path.join(root, "launch.sh"), *where, "ep_forward", f"--out={tmp_path / name}.npy"],
                       env=env, check=True, timeout=300, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-6, rtol=0)
