"""moejax's features on both stacks of the encoder-decoder models: a moejax policy with a huge capacity equals
the family's own dropless result, capacity-aware drop and expanded drop in encoder and decoder layers
against a brute force, expert parallelism on 8 devices equal to one device, buffered decoding equal to
unbuffered, decode loads of the decoder's MoE layers, routing statistics split by stack, and a training
loss differentiable through the forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import buffering, parallel, seq2seq
from moejax.generate import decode

from tests import seq2seq_hf_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    load = seq2seq_hf_models.loader(tmp_path_factory)
    return lambda name: load(name)[1]


SOURCES = [[5, 17, 33, 8, 61, 12, 40, 9, 77], [21, 6, 90, 14, 3]]


def padded(sources=SOURCES, pad=1):
    length = max(len(s) for s in sources)
    ids = np.full((len(sources), length), pad)
    mask = np.zeros(ids.shape, bool)
    for row, s in enumerate(sources):
        ids[row, :len(s)], mask[row, :len(s)] = s, True
    return ids, mask


DECODER_INPUT = np.array([[2, 44, 13, 70, 5, 29], [2, 8, 8, 51, 30, 66]])


def forward(model, sources, mask, decoder_ids):
    return nnx.jit(lambda m: m.forward(sources, decoder_ids, source_mask=mask))(model)


@pytest.mark.parametrize("name", ["nllb-e4-step2", "switch-e4-one-sparse"])
def test_a_huge_moejax_capacity_equals_the_familys_own_dropless_result(models, name):
    model = models(name)  # the family's capacity does not bind in these variants
    sources, mask = padded(pad=model.config.pad_token_id)
    family = np.asarray(model(sources, DECODER_INPUT, source_mask=mask))
    huge = moejax.with_policy(model, moejax.MoEPolicy(capacity_factor=1000.0))
    np.testing.assert_allclose(np.asarray(huge(sources, DECODER_INPUT, source_mask=mask)), family, rtol=1e-6, atol=1e-6)


def brute_force_keep(scores, candidates, capacity):
    """bool [T, E]: each expert keeps its `capacity` candidate tokens of highest score, ties to the lower token."""
    keep = np.zeros(scores.shape, bool)
    for e in range(scores.shape[1]):
        ranked = sorted(np.flatnonzero(candidates[:, e]), key=lambda t: (-scores[t, e], t))
        keep[ranked[:capacity], e] = True
    return keep


def dense_keep(r):
    """The pairs a Routing computes as bool [T, E]."""
    keep = np.zeros(r.scores.shape, bool)
    for t, (experts, kept) in enumerate(zip(np.asarray(r.experts), np.asarray(r.keep))):
        keep[t, experts[kept]] = True
    return keep


@pytest.mark.parametrize("expanded", [None, "global", "local"])
def test_capacity_aware_drop_in_encoder_and_decoder_layers_equals_a_brute_force(models, expanded):
    model = models("nllb-e8-all-sparse-binding-prioritized-untied")
    factor, k, num_experts = 0.5, 2, model.config.num_experts
    policy = moejax.MoEPolicy(capacity_factor=factor, expanded=expanded, num_devices=4 if expanded == "local" else None)
    dropping = moejax.with_policy(model, policy)
    sources, mask = padded(pad=model.config.pad_token_id)
    out = forward(dropping, sources, mask, DECODER_INPUT)
    real = {"encoder": mask.reshape(-1), "decoder": np.ones(DECODER_INPUT.size, bool)}
    checked = {"encoder": 0, "decoder": 0}
    for stack, routings in (("encoder", out.encoder_routings), ("decoder", out.decoder_routings)):
        for r in routings:
            if r is None:
                continue
            scores, tokens = np.asarray(r.scores), real[stack]
            routed = np.zeros(scores.shape, bool)
            np.put_along_axis(routed, np.asarray(r.experts)[:, :k], True, axis=1)
            if expanded == "global":
                routed[:] = True
            elif expanded == "local":
                devices = dropping.moe_blocks()[0].layout.token_devices(len(tokens))
                routed |= (np.arange(num_experts) // (num_experts // 4))[None, :] == devices[:, None]
            capacity = math.ceil(factor * tokens.sum() * k / num_experts)
            expected = brute_force_keep(scores, routed & tokens[:, None], capacity)
            np.testing.assert_array_equal(dense_keep(r), expected)
            assert expected[tokens].sum() < (routed & tokens[:, None]).sum()  # the capacity binds
            checked[stack] += 1
    assert checked["encoder"] and checked["decoder"]


@pytest.mark.parametrize("name", ["nllb-e8-all-sparse-binding-prioritized-untied", "switch-e8-all-sparse-binding-untied"])
def test_expert_parallelism_on_8_devices_equals_one_device_in_both_stacks(models, name):
    model = models(name)
    assert len(jax.devices()) == 8
    sharded = parallel.expert_parallel(model, parallel.make_mesh())
    assert {b.layer < model.config.encoder_layers for b in sharded.moe_blocks()} == {True, False}
    sources, mask = padded(pad=model.config.pad_token_id)
    np.testing.assert_allclose(np.asarray(sharded(sources, DECODER_INPUT, source_mask=mask)),
                               np.asarray(model(sources, DECODER_INPUT, source_mask=mask)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, policy, prefetch", [("switch-e4-one-sparse", "lifo", False),
                                                    ("nllb-e6-expert-capacity-binding", "lru", True)])
def test_buffered_decoding_equals_unbuffered_and_traces_every_moe_layer(models, name, policy, prefetch):
    model = models(name)
    expected = np.asarray(moejax.generate(model, SOURCES, max_new_tokens=6))
    run = buffering.generate(model, SOURCES, max_new_tokens=6, cache_size=2, policy=policy, prefetch=prefetch)
    np.testing.assert_array_equal(run.tokens, expected)
    if prefetch:  # the encoder's second MoE layer is predicted by its first
        assert sum(s.prefetch_loads for s in run.stats.values()) > 0
    layers = [b.layer for b in model.moe_blocks()]
    assert sorted(run.trace) == layers
    encoder_layers = [layer for layer in layers if layer < model.config.encoder_layers]
    for layer in encoder_layers:  # the encoder runs in the prefill only
        assert run.trace[layer][0] and not any(run.trace[layer][1:])
    assert any(run.stats[layer].misses for layer in layers if layer not in encoder_layers)


def test_decode_loads_of_the_decoder_equal_a_teacher_forced_forward(models):
    model = models("nllb-e4-step2")  # capacity 1.0 of the tokens: never binds, so steps and one forward agree
    steps = 6
    out = decode(model, SOURCES, steps, record_loads=True, stop_tokens=())
    tokens = np.asarray(out.tokens)
    decoder_ids = np.concatenate([np.full((2, 1), model.config.decoder_start_token_id), tokens[:, :-1]], axis=1)
    sources, mask = padded(pad=model.config.pad_token_id)
    forced = forward(model, sources, mask, decoder_ids)
    loads = np.asarray(out.loads)
    for j, block in enumerate(model.moe_blocks()):
        if block.layer < model.config.encoder_layers:
            r = forced.routings[block.layer]
            expected = np.bincount(np.asarray(r.experts)[mask.reshape(-1)].reshape(-1), minlength=4)
            np.testing.assert_array_equal(loads[0, j], expected)
            assert not loads[1:, j].any()
            continue
        experts = np.asarray(forced.routings[block.layer].experts).reshape(2, steps, -1)
        for t in range(steps):
            np.testing.assert_array_equal(loads[t, j], np.bincount(experts[:, t].reshape(-1), minlength=4))


def test_routing_statistics_split_by_stack(models):
    model = models("nllb-e6-expert-capacity-binding")
    sources, mask = padded(pad=model.config.pad_token_id)
    out = forward(model, sources, mask, DECODER_INPUT)
    loads = out.layer_loads(mask, np.ones(DECODER_INPUT.shape, bool), top_k=2)
    assert set(loads) == {"encoder", "decoder"}
    assert sorted(loads["encoder"]) == [i for i, r in enumerate(out.encoder_routings) if r is not None]
    first_decoder = model.config.encoder_layers  # the model's layer numbering
    assert sorted(loads["decoder"]) == [first_decoder + j for j, r in enumerate(out.decoder_routings) if r is not None]
    for layer in loads["encoder"].values():
        assert layer.routed.sum() == 2 * mask.sum() and layer.tokens == mask.sum()
    for layer in loads["decoder"].values():
        assert layer.routed.sum() == 2 * DECODER_INPUT.size
    assert any(layer.drop_rate > 0 for stack in loads.values() for layer in stack.values())  # expert_capacity=3


def test_a_training_loss_is_differentiable_through_the_forward(models):
    from moejax.training import LossWeights, for_training
    from moejax.training.losses import seq2seq_loss

    model = for_training(moejax.with_policy(models("switch-e4-one-sparse"), moejax.MoEPolicy()))
    sources, mask = padded(pad=0)
    target = np.concatenate([np.zeros((2, 1), int), DECODER_INPUT[:, 1:], np.ones((2, 1), int)], axis=1)
    batch = (jnp.asarray(sources), jnp.asarray(mask), jnp.asarray(target), jnp.ones(target.shape, bool))
    loss = lambda m, batch: seq2seq_loss(m, batch, LossWeights()).total
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, batch)
    assert np.isfinite(float(value))
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() for g in flat.values())
    routers = [g for path, g in flat.items() if path[-1] == "router"]
    assert len(routers) == 2 and all(np.abs(g).sum() > 0 for g in routers)  # the router terms reach the routers


def test_decode_loads_of_an_encoder_decoder_model_report_its_decoder_layers(models):
    from moejax import evaluation

    model = models("nllb-e6-expert-capacity-binding")
    report = evaluation.decode_loads(model, SOURCES, steps=4, stop_tokens=())
    decoder_moe = [b.layer for b in model.moe_blocks() if b.layer >= model.config.encoder_layers]
    assert report["layers"] == decoder_moe and report["steps"] == 4
    out = decode(model, SOURCES, 5, record_loads=True, stop_tokens=())
    columns = [j for j, b in enumerate(model.moe_blocks()) if b.layer in decoder_moe]
    counts = np.asarray(out.loads)[1:, columns]
    np.testing.assert_allclose(report["idle_fraction"], (counts == 0).mean(axis=(0, 2)))


def test_a_load_trace_of_both_stacks_fits_a_placement(models):
    from moejax import placement

    model = models("nllb-e8-all-sparse-binding-prioritized-untied")
    sources, mask = padded(pad=model.config.pad_token_id)
    decoder_mask = np.ones(DECODER_INPUT.shape, bool)
    trace = seq2seq.load_trace(model, [(sources, mask, DECODER_INPUT, decoder_mask)] * 2)
    blocks = model.moe_blocks()
    assert trace.shape == (2, len(blocks), 8)
    out = forward(model, sources, mask, DECODER_INPUT)
    for j, block in enumerate(blocks):
        encoder = block.layer < model.config.encoder_layers
        real = (mask if encoder else decoder_mask).reshape(-1)
        experts = np.asarray(out.routings[block.layer].experts)[real]
        np.testing.assert_array_equal(trace[0, j], np.bincount(experts.reshape(-1), minlength=8))
    device_of_expert = placement.greedy(trace[:, 0].mean(axis=0), 4)
    assert sorted(np.bincount(device_of_expert, minlength=4)) == [2, 2, 2, 2]


@pytest.mark.parametrize("name", ["nllb-e6-expert-capacity-binding", "switch-e4-one-sparse"])
def test_split_experts_give_the_stacked_models_logits_and_tokens_on_one_device_and_on_a_mesh(tmp_path_factory, name):
    _, stacked, directory = seq2seq_hf_models.loader(tmp_path_factory)(name)
    split = seq2seq.load_pretrained(directory, expert_storage="split")
    assert {b.expert_storage for b in split.moe_blocks()} == {"split"}
    sources, mask = padded(pad=stacked.config.pad_token_id)
    np.testing.assert_allclose(np.asarray(split(sources, DECODER_INPUT, source_mask=mask)),
                               np.asarray(stacked(sources, DECODER_INPUT, source_mask=mask)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(moejax.generate(split, SOURCES, 6)),
                                  np.asarray(moejax.generate(stacked, SOURCES, 6)))
    sharded = seq2seq.load_pretrained(directory, mesh=parallel.make_mesh(expert=2, data=4), expert_storage="split")
    np.testing.assert_array_equal(np.asarray(moejax.generate(sharded, SOURCES, 6)),
                                  np.asarray(moejax.generate(stacked, SOURCES, 6)))
