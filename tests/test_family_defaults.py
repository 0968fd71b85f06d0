"""moejax.family_defaults: what transformers' config class of each family assumes for a key config.json
leaves out, so that a checkpoint whose config.json omits a field loads as the same model in both libraries."""

import inspect
import json
from unittest import mock

import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp
import moejax
from moejax import family_defaults
from moejax.config import SUPPORTED_MODEL_TYPES, from_hf_config
from tests import hf_models
from tests.hf_models import build

# PreTrainedConfig arguments of every family, and training-only ones: no model moejax builds depends on them
_NOT_READ = {"use_cache", "initializer_range", "output_router_logits", "router_aux_loss_coef", "pretraining_tp",
             "resid_pdrop", "emb_pdrop", "router_z_loss_coef", "tie_encoder_decoder"}


def transformers_defaults() -> dict[str, dict]:
    """Per supported model type transformers knows: its config class's constant __init__ defaults (those it
    derives from other fields, given as None there, are left to moejax's readers) and its default rope theta."""
    generic = set(inspect.signature(transformers.PreTrainedConfig.__init__).parameters)
    table = {}
    for model_type in sorted(SUPPORTED_MODEL_TYPES):
        try:
            config_class = type(transformers.AutoConfig.for_model(model_type))
        except ValueError:  # not in transformers (an alias moejax reads as another family)
            continue
        defaults = {}
        for name, p in inspect.signature(config_class.__init__).parameters.items():
            value = p.default
            if (name in generic or name in _NOT_READ or "dropout" in name or value is inspect.Parameter.empty
                    or value is None):
                continue
            if isinstance(value, (bool, int, float, str)) or (
                    isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                # under the name config.json holds it by (an argument may be an alias of it)
                defaults[config_class.attribute_map.get(name, name)] = list(value) if isinstance(value, tuple) else value
        defaults["rope_theta"] = float(config_class.default_theta)
        table[model_type] = defaults
    return table


def transformers_aliases() -> dict[str, dict[str, str]]:
    """Per model type of transformers_defaults: its config class's attribute_map (an older name of a key ->
    the name config.json holds it by), where it has one."""
    return {model_type: dict(sorted(config_class.attribute_map.items()))
            for model_type in transformers_defaults()
            if (config_class := type(transformers.AutoConfig.for_model(model_type))).attribute_map}


def format_table(name: str, table: dict[str, dict]) -> str:
    """A table as the Python source of moejax/family_defaults.py writes it: one wrapped dict(...) per family."""
    import textwrap

    lines = [f"{name} = {{"]
    for model_type, entries in table.items():
        items = ", ".join(f"{k}={v!r}" for k, v in sorted(entries.items()))
        lines += textwrap.wrap(f"{model_type!r}: dict({items}),", width=114, initial_indent="    ",
                               subsequent_indent="        ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines + ["}"]) + "\n"


def test_the_tables_are_transformers_own():
    live = {"DEFAULTS": transformers_defaults(), "ALIASES": transformers_aliases()}
    assert (family_defaults.DEFAULTS, family_defaults.ALIASES) == (live["DEFAULTS"], live["ALIASES"]), (
        "moejax/family_defaults.py is out of date with the installed transformers; its tables should read:\n"
        + "\n\n".join(format_table(name, table) for name, table in live.items()))


@pytest.mark.parametrize("variant", sorted(hf_models.VARIANTS))
def test_a_key_left_out_that_holds_its_default_changes_nothing(variant):
    """from_hf_config of a test family's config.json without every key whose value is its family's default
    (the rope too, where it is the default rope) equals that of the full config transformers writes."""
    config_class, _, fields = hf_models.VARIANTS[variant]
    full = getattr(transformers, config_class)(**{**hf_models._BASE, **fields}).to_dict()
    defaults = family_defaults.DEFAULTS.get(full["model_type"])
    if defaults is None:
        pytest.skip(f"{full['model_type']} is not in transformers' config classes")
    sparse = {k: v for k, v in full.items() if k == "model_type" or k not in defaults or v != defaults[k]}
    if full.get("rope_parameters") == {"rope_type": "default", "rope_theta": defaults["rope_theta"]}:
        del sparse["rope_parameters"]
    assert len(sparse) < len(full)
    expected = from_hf_config(full)
    with mock.patch.dict(family_defaults.DEFAULTS, clear=True):  # a complete config reads alike without them
        assert from_hf_config(full) == expected
    assert from_hf_config(sparse) == expected
    # a key under an older name (config.json of transformers 4: Qwen3-MoE's num_experts) keeps its default out
    for alias, name in family_defaults.ALIASES.get(full["model_type"], {}).items():
        if name in full and name in defaults and full[name] != defaults[name]:
            renamed = {alias if k == name else k: v for k, v in full.items()}
            with mock.patch.dict(family_defaults.DEFAULTS, clear=True):
                unfilled = _read_or_error(renamed)
            assert _read_or_error(renamed) == unfilled, (alias, name)


def _read_or_error(hf: dict):
    try:
        return from_hf_config(hf)
    except ValueError as e:  # a reader that takes the key by its current name only
        return str(e)


def test_a_mixtral_config_without_its_rope_and_norm_fields_loads_as_transformers_does(tmp_path):
    build("mixtral-e4k2").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = moejax.load_pretrained(tmp_path)
    assert (model.config.rope.theta, model.config.rms_norm_eps) == (1e6, 1e-5)  # MixtralConfig's, not 1e4 / 1e-6
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    tokens = np.array([[3, 17, 42, 5, 9, 60, 11, 2, 33, 70, 1, 4]])
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)
