"""Encoder-decoder MoE models (NLLB-MoE, Switch Transformers) against transformers on tiny random checkpoints
built from a config: float32 logits for (source, decoder input) pairs, greedy generation for two sources of
different lengths, the families' own capacity where it binds, the config readers' refusals, and an exported
nllb-moe checkpoint that transformers loads to the same logits."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from flax import nnx

import moejax
from moejax import seq2seq

from tests import seq2seq_hf_models
from tests.tiny import tiny_config

VARIANTS = list(seq2seq_hf_models.VARIANTS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return seq2seq_hf_models.loader(tmp_path_factory)


def batch(reference, seed=0, source_lengths=(9, 6), decoder_length=7):
    """Right-padded sources (as the families' tokenizers pad) with their mask, and decoder inputs: ids drawn
    above the special tokens."""
    rng = np.random.default_rng(seed)
    pad = reference.config.pad_token_id
    sources = np.full((len(source_lengths), max(source_lengths)), pad)
    mask = np.zeros(sources.shape, bool)
    for row, length in enumerate(source_lengths):
        sources[row, :length] = rng.integers(3, reference.config.vocab_size, length)
        mask[row, :length] = True
    return sources, mask, rng.integers(3, reference.config.vocab_size, (len(source_lengths), decoder_length))


def reference_logits(reference, sources, mask, decoder_ids):
    with torch.no_grad():
        return reference(input_ids=torch.tensor(sources), attention_mask=torch.tensor(mask.astype(np.int64)),
                         decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()


def assert_close_to_logit_scale(ours, expected, tolerance=1e-4):
    assert np.abs(np.asarray(ours) - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_transformers(checkpoints, name):
    reference, model, _ = checkpoints(name)
    sources, mask, decoder_ids = batch(reference)
    expected = reference_logits(reference, sources, mask, decoder_ids)
    assert_close_to_logit_scale(model(sources, decoder_ids, source_mask=mask), expected)


@pytest.mark.parametrize("name", ["nllb-e8-all-sparse-binding-prioritized-untied", "switch-e8-all-sparse-binding-untied"])
def test_logits_of_right_padded_decoder_inputs_equal_transformers(checkpoints, name):
    """Teacher forcing as training feeds it: targets right-padded with the pad token and masked."""
    reference, model, _ = checkpoints(name)
    sources, mask, decoder_ids = batch(reference, seed=4)
    decoder_mask = np.ones(decoder_ids.shape, bool)
    decoder_mask[1, -3:] = False
    decoder_ids[1, -3:] = reference.config.pad_token_id
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(sources), attention_mask=torch.tensor(mask.astype(np.int64)),
                             decoder_input_ids=torch.tensor(decoder_ids),
                             decoder_attention_mask=torch.tensor(decoder_mask.astype(np.int64))).logits.numpy()
    ours = np.asarray(model(sources, decoder_ids, source_mask=mask, decoder_mask=decoder_mask))
    assert_close_to_logit_scale(ours[decoder_mask], expected[decoder_mask])


@pytest.mark.parametrize("name", [n for n in VARIANTS if "binding" in n])
def test_the_family_capacity_binds_in_both_stacks_and_matches_transformers(checkpoints, name):
    reference, model, _ = checkpoints(name)
    sources, mask, decoder_ids = batch(reference, seed=3)
    out = nnx.jit(lambda m: m.forward(sources, decoder_ids, source_mask=mask))(model)
    real = {"encoder": mask.reshape(-1), "decoder": np.ones(decoder_ids.size, bool)}
    for stack, routings in (("encoder", out.encoder_routings), ("decoder", out.decoder_routings)):
        keeps = [np.asarray(r.keep)[real[stack]] for r in routings if r is not None]
        assert keeps and not all(k.all() for k in keeps), f"nothing dropped in the {stack}: the variant does not bind"
    # dropless (a moejax policy with no capacity) differs, so the family's drop is what matched transformers
    dropless = moejax.with_policy(model, moejax.MoEPolicy())
    expected = reference_logits(reference, sources, mask, decoder_ids)
    assert_close_to_logit_scale(out.logits, expected)
    assert np.abs(np.asarray(dropless(sources, decoder_ids, source_mask=mask)) - expected).max() > 1e-3


@pytest.mark.parametrize("name, forced", [("nllb-e8-all-sparse-binding-prioritized-untied", None),
                                          ("nllb-e6-expert-capacity-binding", 7),
                                          ("switch-e8-all-sparse-binding-untied", None)])
def test_greedy_generation_equals_transformers_generate(checkpoints, name, forced):
    reference, model, _ = checkpoints(name)
    sources, mask, _ = batch(reference, seed=1, source_lengths=(9, 5))
    lists = [list(row[m]) for row, m in zip(sources, mask)]
    ours = np.asarray(moejax.generate(model, lists, max_new_tokens=8, forced_bos_token_id=forced))
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.tensor(sources), attention_mask=torch.tensor(mask.astype(np.int64)),
                                      max_new_tokens=8, num_beams=1, do_sample=False,
                                      forced_bos_token_id=forced).numpy()
    np.testing.assert_array_equal(ours, expected[:, 1:])  # transformers' first token is the start token
    assert len(set(ours.reshape(-1).tolist())) > 2, "a degenerate reference: the comparison shows little"
    if forced is not None:
        assert (ours[:, 0] == forced).all()


def test_a_row_that_draws_a_stop_token_stops_as_in_transformers(checkpoints):
    reference, model, _ = checkpoints("switch-e8-all-sparse-binding-untied")  # decode steps never bind here
    sources, mask, _ = batch(reference, seed=1, source_lengths=(9, 5))
    lists = [list(row[m]) for row, m in zip(sources, mask)]
    stop = int(np.asarray(moejax.generate(model, lists, max_new_tokens=8))[0, 2])
    ours = np.asarray(moejax.generate(model, lists, max_new_tokens=8, stop_tokens=[stop]))
    with torch.no_grad():
        expected = reference.generate(input_ids=torch.tensor(sources), attention_mask=torch.tensor(mask.astype(np.int64)),
                                      max_new_tokens=8, num_beams=1, do_sample=False, eos_token_id=stop,
                                      pad_token_id=reference.config.pad_token_id).numpy()[:, 1:]
    assert ours[0, 2] == stop and (ours[0, 3:] == reference.config.pad_token_id).all()
    np.testing.assert_array_equal(ours[:, :expected.shape[1]], expected)


def test_sampling_takes_a_key_and_follows_it(checkpoints):
    _, model, _ = checkpoints("switch-e8-all-sparse-binding-untied")
    sources = [[5, 6, 7, 8], [9, 10]]
    draw = lambda seed: np.asarray(moejax.generate(model, sources, max_new_tokens=6, temperature=1.0,
                                                   key=jax_key(seed)))
    np.testing.assert_array_equal(draw(0), draw(0))
    assert not np.array_equal(draw(0), draw(1))
    with pytest.raises(ValueError, match="explicit PRNG key"):
        moejax.generate(model, sources, max_new_tokens=2, temperature=1.0)


def jax_key(seed):
    import jax

    return jax.random.key(seed)


@pytest.mark.parametrize("name", ["nllb-e8-all-sparse-binding-prioritized-untied", "switch-e4-one-sparse",
                                  "switch-e8-all-sparse-binding-untied"])
def test_export_loads_in_transformers_with_identical_logits_and_back(checkpoints, tmp_path, name):
    reference, model, _ = checkpoints(name)
    seq2seq.export_pretrained(model, tmp_path / "exported")
    with open(tmp_path / "exported" / "config.json") as f:
        assert json.load(f)["model_type"] == model.config.architecture
    exported = type(reference).from_pretrained(tmp_path / "exported").eval()
    if model.config.architecture == "nllb-moe":
        seq2seq_hf_models.use_fairseq_experts(exported)
    sources, mask, decoder_ids = batch(reference, seed=2)
    expected = reference_logits(reference, sources, mask, decoder_ids)
    np.testing.assert_allclose(reference_logits(exported, sources, mask, decoder_ids), expected, rtol=0, atol=0)
    again = seq2seq.load_pretrained(tmp_path / "exported")
    np.testing.assert_array_equal(np.asarray(again(sources, decoder_ids, source_mask=mask)),
                                  np.asarray(model(sources, decoder_ids, source_mask=mask)))
    # over an existing checkpoint: refused, or (overwrite=True) replaced whole, as moejax.export_pretrained
    with pytest.raises(FileExistsError, match=r"is not empty \(config.json, model.safetensors\)"):
        seq2seq.export_pretrained(model, tmp_path / "exported")
    seq2seq.export_pretrained(again, tmp_path / "exported", overwrite=True)
    np.testing.assert_array_equal(np.asarray(seq2seq.load_pretrained(tmp_path / "exported")(
        sources, decoder_ids, source_mask=mask)), np.asarray(model(sources, decoder_ids, source_mask=mask)))


@pytest.mark.parametrize("name", ["nllb-e8-all-sparse-binding-prioritized-untied"])  # the path is the families' own
def test_converted_checkpoints_restore_the_model_each_loader_only_its_own(checkpoints, tmp_path, name):
    reference, model, _ = checkpoints(name)
    sources, mask, decoder_ids = batch(reference, seed=3)
    expected = np.asarray(model(sources, decoder_ids, source_mask=mask))
    moejax.save_converted(model, tmp_path / "converted")
    for storage in ("stacked", "split"):
        again = seq2seq.load_pretrained(tmp_path / "converted", expert_storage=storage)
        assert again.config == model.config
        np.testing.assert_array_equal(np.asarray(again(sources, decoder_ids, source_mask=mask)), expected)
        np.testing.assert_array_equal(np.asarray(moejax.generate(again, sources, 4, stop_tokens=())),
                                      np.asarray(moejax.generate(model, sources, 4, stop_tokens=())))
    bf16 = seq2seq.load_pretrained(tmp_path / "converted", dtype="bfloat16")
    assert bf16.dtype == np.dtype("bfloat16") and bf16.embed_tokens[...].dtype == np.dtype("bfloat16")
    with pytest.raises(ValueError, match=r"holds a converted encoder_decoder model: load it with moejax.seq2seq"):
        moejax.load_pretrained(tmp_path / "converted")
    moejax.save_converted(moejax.random_model(tiny_config(), seed=0), tmp_path / "causal")
    with pytest.raises(ValueError, match=r"holds a converted causal_lm model: load it with moejax.load_pretrained"):
        seq2seq.load_pretrained(tmp_path / "causal")
    parallel = seq2seq.load_pretrained(tmp_path / "converted", mesh=moejax.parallel.make_mesh())
    with pytest.raises(ValueError, match=r"save_converted needs the single-device model"):
        moejax.save_converted(parallel, tmp_path / "parallel")
    assert not os.path.exists(tmp_path / "parallel")


# -- bad input


def edited_config(directory, tmp_path, **changes):
    """A copy of a checkpoint directory with config.json keys changed (None: removed)."""
    target = tmp_path / "edited"
    target.mkdir()
    for name in os.listdir(directory):
        os.symlink(os.path.join(directory, name), target / name)
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (target / "config.json").unlink()
    (target / "config.json").write_text(json.dumps(config))
    (target / "generation_config.json").unlink()
    return target


def test_a_source_longer_than_the_positions_allow_is_refused(checkpoints):
    reference, model, _ = checkpoints("nllb-e4-step2")
    too_long = [list(range(3, 3 + 65)), [5, 6]]  # max_position_embeddings=64
    with pytest.raises(ValueError, match=r"source 0 has 65 tokens.*max_position_embeddings=64"):
        moejax.generate(model, too_long, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"max_position_embeddings=64"):
        model(np.full((1, 65), 5), np.full((1, 2), 5))


def test_a_decoder_start_token_outside_the_vocabulary_is_refused_naming_it_and_the_file(checkpoints, tmp_path):
    _, _, directory = checkpoints("nllb-e4-step2")
    edited = edited_config(directory, tmp_path, decoder_start_token_id=500)
    with pytest.raises(ValueError, match=r"decoder_start_token_id=500.*outside the vocabulary \[0, 96\).*config.json"):
        seq2seq.load_pretrained(edited)


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["SwitchTransformersEncoderModel"]), "encoder-only"),
    (dict(is_encoder_decoder=False), "encoder-only"),
    (dict(model_type="t5"), "model_type 't5' is not an encoder-decoder MoE family"),
    (dict(router_dtype="bfloat16"), "router_dtype='bfloat16'"),
    (dict(dense_act_fn="gated-gelu"), "dense_act_fn='gated-gelu'"),
    (dict(num_heads="4"), r"num_heads='4' is invalid: must be int"),
])
def test_switch_configs_moejax_cannot_compute_are_refused_by_name(checkpoints, tmp_path, changes, message):
    _, _, directory = checkpoints("switch-e4-one-sparse")
    with pytest.raises(ValueError, match=message):
        seq2seq.load_pretrained(edited_config(directory, tmp_path, **changes))


@pytest.mark.parametrize("changes, message", [
    (dict(second_expert_policy="sampling"), "second_expert_policy='sampling'"),
    (dict(router_ignore_padding_tokens=True), "router_ignore_padding_tokens=True"),
    (dict(encoder_attention_heads=2), "encoder_attention_heads=2"),
])
def test_nllb_configs_moejax_cannot_compute_are_refused_by_name(checkpoints, tmp_path, changes, message):
    _, _, directory = checkpoints("nllb-e4-step2")
    with pytest.raises(ValueError, match=message):
        seq2seq.load_pretrained(edited_config(directory, tmp_path, **changes))


def test_a_missing_tensor_is_named_with_the_checkpoint(checkpoints, tmp_path):
    _, _, directory = checkpoints("nllb-e4-step2")
    edited = edited_config(directory, tmp_path, encoder_sparse_step=1)  # layer 0 now wants experts
    with pytest.raises(ValueError, match=r"missing tensor 'model.encoder.layers.0.ffn.router.classifier.weight'"):
        seq2seq.load_pretrained(edited)


def test_the_decoder_only_loader_points_an_encoder_decoder_checkpoint_to_moejax_seq2seq(checkpoints):
    _, _, directory = checkpoints("switch-e4-one-sparse")
    with pytest.raises(ValueError, match=r"'switch_transformers' is an encoder-decoder model: load it with "
                                         r"moejax.seq2seq.load_pretrained"):
        moejax.load_pretrained(directory)


def test_a_layout_switch_transformers_cannot_express_is_refused_naming_the_field(checkpoints):
    _, model, _ = checkpoints("switch-e4-one-sparse")
    layers = model.config.encoder_layers
    # layer 0 alone sparse: SwitchTransformersConfig makes layer i sparse where i % step == 1 (all for step 1)
    config = dataclasses.replace(model.config, encoder_moe_layers=(True,) + (False,) * (layers - 1))
    with pytest.raises(ValueError, match=r"encoder_moe_layers=\(True, False.*num_sparse_encoder_layers"):
        seq2seq.to_hf_config(config)
    with pytest.raises(ValueError, match="encoder_ffn_dim / decoder_ffn_dim"):
        seq2seq.to_hf_config(dataclasses.replace(model.config, decoder_ffn_dim=model.config.encoder_ffn_dim + 8))
