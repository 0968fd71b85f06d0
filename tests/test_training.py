"""Training: the experts step, router auxiliaries and loss against brute force; a short run that learns;
an interrupted run that resumes exactly; the data-parallel step equal to the single-device one."""

import os
import sysconfig

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import kernels, training

VOCAB = 64


def _tiny_model(seed=0, **overrides):
    fields = dict(architecture="olmoe", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, max_position_embeddings=128,
                  tie_word_embeddings=True, eos_token_id=0)
    fields.update(overrides)
    return moejax.random_model(training.model_config(**fields), seed=seed)


def _grouped_rows(seed, num_rows=40, num_groups=5, d=8, f=6, used=34):
    rng = np.random.default_rng(seed)
    sizes = np.bincount(rng.integers(0, num_groups, used), minlength=num_groups)
    x = rng.normal(size=(num_rows, d)).astype(np.float32)
    weights = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((num_groups, d, f),) * 2 + ((num_groups, f, d),)]
    return jnp.asarray(x), jnp.asarray(sizes, jnp.int32), [jnp.asarray(w) for w in weights]


def test_capacity_buffers_gradients_match_ragged_dot_when_nothing_is_dropped():
    x, sizes, weights = _grouped_rows(1)

    def loss(fn, x, *w):
        return jnp.sum(jnp.sin(fn(x, sizes, *w)))

    buffered = jax.grad(lambda *a: loss(lambda x, s, *w: kernels.grouped_ffn(x, s, *w, implementation="capacity_buffers", capacity=40), *a),
                        argnums=(0, 1, 2, 3))(x, *weights)
    ragged = jax.grad(lambda *a: loss(lambda x, s, *w: kernels.grouped_ffn(x, s, *w, implementation="ragged_dot"), *a),
                      argnums=(0, 1, 2, 3))(x, *weights)
    for ours, theirs in zip(buffered, ragged):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_router_auxiliary_losses_against_brute_force():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 6)) * 2
    mask = np.array([True] * 8 + [False] * 2)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1)[:, :2]
    routed = np.zeros(6)
    for t in range(8):
        for e in experts[t]:
            routed[e] += 1
    expected_balance = 6 * np.sum(routed / 16 * probs[:8].mean(0))
    expected_z = np.mean(np.log(np.exp(logits[:8]).sum(-1)) ** 2)
    balance = training.load_balance_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(experts), jnp.asarray(mask))
    z = training.router_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(balance), expected_balance, rtol=1e-5)
    np.testing.assert_allclose(float(z), expected_z, rtol=1e-5)
    uniform = training.load_balance_loss(jnp.full((6, 6), 1 / 6), jnp.asarray(np.arange(6)[:, None]),
                                         jnp.ones(6, bool))
    np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)  # the balanced optimum


def test_loss_cross_entropy_is_the_models_own():
    """loss_terms' cross-entropy equals one computed from model(tokens) logits, padding excluded, when the
    training capacity buffers are large enough that nothing is dropped."""
    model = _tiny_model()
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, VOCAB, size=(3, 13))
    mask = np.ones(tokens.shape, bool)
    mask[0, :4] = False  # left padding
    mask[2, :9] = False
    loss = nnx.jit(lambda m, t, k: training.loss_terms(m, t, k, training.LossWeights(0.5, 0.25)))
    terms = loss(training.for_training(model, capacity_factor=100.0), jnp.asarray(tokens), jnp.asarray(mask))
    nll, count = 0.0, 0
    for row, m in zip(tokens, mask):
        real = row[m]
        logits = np.asarray(model(jnp.asarray(real[None, :-1])), np.float64)[0]
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll -= logprobs[np.arange(len(real) - 1), real[1:]].sum()
        count += len(real) - 1
    np.testing.assert_allclose(float(terms.cross_entropy), nll / count, rtol=1e-5)
    np.testing.assert_allclose(float(terms.total),
                               float(terms.cross_entropy + 0.5 * terms.load_balance + 0.25 * terms.router_z), rtol=1e-6)
    assert float(terms.load_balance) >= 1.0 - 1e-5  # Switch loss is minimal (1) at perfect balance


def test_data_parallel_step_equals_single_device_step():
    assert len(jax.devices()) == 8
    batch = np.random.default_rng(4).integers(0, VOCAB, size=(8, 17))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        trainer = training.Trainer(_tiny_model(), training.make_optimizer(1e-2, 2, 10), training.LossWeights(),
                                   training.data_mesh(devices))
        state, terms = trainer.step(trainer.init(), batch)
        assert state.params["embed_tokens"][...].sharding.is_fully_replicated
        results.append((float(terms.total), jax.tree.leaves(jax.device_get(state.params))))
    (loss_one, params_one), (loss_all, params_all) = results
    np.testing.assert_allclose(loss_all, loss_one, rtol=1e-5)
    for a, b in zip(params_all, params_one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="batch size 6 must be a multiple of the 8 devices"):
        trainer.step(trainer.init(), batch[:6])


def _run_config(corpus_dir, steps=6, **changes):
    config = ml_collections.ConfigDict(dict(
        seed=0, corpus=str(corpus_dir), validation_fraction=0.25, test_fraction=0.0, vocab_size=320,
        model=dict(architecture="olmoe", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=16, max_position_embeddings=64,
                   tie_word_embeddings=True),
        sequence_length=32, batch_size=8, steps=steps, warmup_steps=1, learning_rate=1e-2, weight_decay=0.0,
        load_balance_coef=0.01, router_z_coef=0.001, capacity_factor=2.0, compute_dtype="float32",
        eval_every=steps, eval_sequences=8, checkpoint_every=2))
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A handful of real stdlib modules, copied so the test does not depend on the whole library."""
    import shutil

    root = sysconfig.get_paths()["stdlib"]
    directory = tmp_path_factory.mktemp("corpus")
    # keyword.py and sched.py fall in the validation split at validation_fraction=0.25
    for name in ("textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "heapq.py", "keyword.py",
                 "sched.py"):
        shutil.copy(f"{root}/{name}", directory / name)
    return directory


@pytest.mark.slow  # tokenizer + compiled training steps: 15-60 s on 2 shared cores
def test_a_short_run_lowers_the_loss(corpus_dir, tmp_path):
    result = training.run(_run_config(corpus_dir, steps=12), str(tmp_path), progress=False)
    losses = [t["cross_entropy"] for t in result["history"]["train"]]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert len(result["history"]["validation"]) == 1
    # the returned model is the trained one, back on the inference experts path
    assert all(b.runtime.experts == moejax.experts.Resident() for b in result["model"].moe_blocks())


@pytest.mark.slow  # tokenizer + compiled training steps: 15-60 s on 2 shared cores
def test_an_interrupted_run_resumes_exactly(corpus_dir, tmp_path):
    config = _run_config(corpus_dir, steps=6)
    uninterrupted = training.run(config, str(tmp_path / "a"), progress=False)["history"]["train"]
    first = training.run(config, str(tmp_path / "b"), progress=False, stop_after=3)
    # when it validates and checkpoints may change on resume; nothing it trains may (below)
    config.eval_every = 2
    resumed = training.run(config, str(tmp_path / "b"), progress=False)
    assert (first["steps_this_call"], resumed["steps_this_call"]) == (3, 3)
    # the resumed call reports the whole run: the first call's steps from the workdir's history
    assert [t["step"] for t in first["history"]["train"]] == [1, 2, 3]
    assert [t["step"] for t in resumed["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(resumed["history"]["train"], uninterrupted):
        np.testing.assert_allclose(ours["total"], theirs["total"], rtol=1e-6)
    assert resumed["history"]["train"][3]["total"] != first["history"]["train"][-1]["total"]  # steps differ
    for change in (dict(seed=7), dict(vocab_size=400), dict(learning_rate=0.5)):
        with pytest.raises(ValueError, match=rf"holds a run started with other settings \({list(change)[0]} differ"):
            training.run(_run_config(corpus_dir, steps=6, **change), str(tmp_path / "b"), progress=False)


@pytest.mark.parametrize("change, match", [
    (dict(eval_every=0), r"config.eval_every=0 must be an integer >= 1"),
    (dict(checkpoint_every=0), r"config.checkpoint_every=0 must be an integer >= 1"),
    (dict(eval_sequences=0), r"config.eval_sequences=0 must be an integer >= 1"),
    (dict(batch_size=0), r"config.batch_size=0 must be an integer >= 1"),
    (dict(warmup_steps=-3), r"config.warmup_steps=-3 must be an integer in \[0, config.steps=6\]"),
    (dict(compute_dtype="bf16"), r"config.compute_dtype='bf16' must be a floating-point dtype"),
    (dict(sequence_length=100), r"config.sequence_length=100 is longer than the model's"),
])
def test_bad_training_settings_are_named_before_any_work(corpus_dir, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        training.run(_run_config(corpus_dir, steps=6, **change), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "tokenizer.json")
