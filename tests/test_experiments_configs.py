"""configs/: every experiment's get_config(arg) loads in each of its variants; the reproduce config nests each
stage's config, shares checkpoint and num_devices, and passes a stage exactly its sub-config (the flags the
stage gets, parsed as the script parses them, give that sub-config back); --quick is the :quick variant."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import harness  # noqa: E402
import stages  # noqa: E402

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_names_a_bad_variant(name):
    config = harness.load_config(f"configs/{name}.py")
    assert config.to_dict()
    if name not in ("quickstart", "reproduce"):
        quick = harness.load_config(f"configs/{name}.py:quick")
        assert set(quick.keys()) == set(config.keys()) and quick != config
    with pytest.raises(ValueError, match="'bogus'"):
        harness.load_config(f"configs/{name}.py:bogus")


def test_reproduce_presets_and_quick():
    config = harness.load_config("configs/reproduce.py:olmoe,quick")
    assert (config.model, config.quick, config.checkpoint) == ("olmoe", True, "")
    assert config.capacity.to_dict() == dict(harness.load_config("configs/capacity_sweep.py:quick").to_dict(),
                                             script="capacity_sweep", checkpoint="")
    config.checkpoint, config.num_devices = "/data/olmoe", 4  # set once, shared by every stage that has them
    assert {config[s].checkpoint for s in config.stages if "checkpoint" in config[s]} == {"/data/olmoe"}
    assert config.capacity.num_devices == 4 and "checkpoint" not in config.gating
    with pytest.raises(ValueError, match="unknown model preset 'olmoe,mixtral'"):
        harness.load_config("configs/reproduce.py:olmoe,mixtral")


def test_every_family_preset_is_a_model_type_moejax_reads_and_takes_the_checkpoint_given():
    from moejax.config import SUPPORTED_MODEL_TYPES

    spec = importlib.util.spec_from_file_location("reproduce_presets", os.path.join(ROOT, "configs", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_type = {"qwen_moe": "qwen2_moe"}  # the one preset named for its family rather than its model_type
    for preset in set(module.PRESETS) - {"default", "nllb_moe"}:
        assert model_type.get(preset, preset) in SUPPORTED_MODEL_TYPES, preset
        config = harness.load_config(f"configs/reproduce.py:{preset},quick")
        assert config.checkpoint == "" and config.num_devices == 8  # a family preset runs on the checkpoint given
        config.checkpoint = f"/data/{preset}"
        assert config.capacity.checkpoint == config.straggler.checkpoint == f"/data/{preset}"


def test_mt_stages_run_on_the_mt_checkpoint():
    from moejax.seq2seq import MODEL_TYPES

    default = harness.load_config("configs/reproduce.py:quick")
    assert {"translation", "mt_gating"} <= set(default.stages) and default.mt_checkpoint == "experiments/mt_model"
    assert default.translation.checkpoint == "experiments/mt_model"
    assert tuple(default.mt_gating.layers) == ("mt_encoder", "mt_decoder")
    assert default.gating.layers != default.mt_gating.layers  # the LM stage keeps its own shapes
    nllb = harness.load_config("configs/reproduce.py:nllb_moe,quick")
    assert tuple(nllb.stages) == ("translation", "mt_gating") and nllb.mt_checkpoint == ""
    nllb.mt_checkpoint = "/data/nllb-moe-54b"
    assert nllb.translation.checkpoint == "/data/nllb-moe-54b"
    assert "nllb-moe" in MODEL_TYPES
    olmoe = harness.load_config("configs/reproduce.py:olmoe")
    assert "translation" not in olmoe.stages  # an LM preset names no MT model


def _parsed(arguments: list[str]) -> dict:
    """The config a script gets from these flags, parsed by config_flags as the script's harness.run does."""
    values, argv = flags.FlagValues(), ["script", *arguments]
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values["config"].value.to_dict()


@pytest.mark.parametrize("variant", ["", "quick"])
def test_each_stage_gets_exactly_its_sub_config(variant, monkeypatch):
    monkeypatch.chdir(ROOT)  # where stages run: their config paths are relative to it
    config = harness.load_config(f"configs/reproduce.py:{variant}")
    config.capacity.tasks = ()
    config.capacity.factors = (1.5, 2.0)
    config.capacity.strategies = ("score", "expanded_local")
    config.placement.devices = (4, 8)
    config.placement.throughput = False
    config.buffering.random_model.router_scale = 4.0
    config.gating.capacity_fraction = 0.5
    config.num_devices = 4
    for stage in config.stages:
        arguments = stages.stage_arguments(config, stage)
        assert arguments[0] == f"--config=configs/{config[stage].script}.py" + (":quick" if variant else "")
        want = config[stage].to_dict()
        del want["script"]
        assert _parsed(arguments) == want, stage
    assert "--config.tasks=()" in stages.stage_arguments(config, "capacity")


def test_dry_run_shows_quick_as_the_quick_variant_with_the_overrides():
    def plan(*arguments):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "reproduce.py"), "--dry_run",
                                 "--workdir=/tmp/plan", *arguments], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, check=True)
        return result.stdout.splitlines()

    lines = plan("--quick", "--config.capacity.sequences=5", "--config.num_devices=4")
    assert lines == plan("--config=configs/reproduce.py:quick", "--config.capacity.sequences=5",
                         "--config.num_devices=4")
    capacity = next(line for line in lines if line.startswith("capacity: "))
    assert capacity == ("capacity: python experiments/capacity_sweep.py --workdir=/tmp/plan/capacity "
                        "--config=configs/capacity_sweep.py:quick --config.num_devices=4 --config.sequences=5")


def test_every_script_on_harness_run_has_its_default_config():
    import re

    for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        source = open(path).read()
        call = re.search(r"harness\.run\(main, [^)]*\)", source)
        if call is None:
            continue
        named = re.search(r'config="([^"]+)"', call.group(0))
        config = named.group(1) if named else f"configs/{os.path.basename(path)}"
        assert os.path.isfile(os.path.join(ROOT, config)), (path, config)
        harness.load_config(config)
