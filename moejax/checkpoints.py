"""Load Hugging Face safetensors checkpoints into moejax models; save/restore converted ones with orbax.

Only safetensors is read (no pickle, no remote code). Every tensor is accounted for before the model is
returned: a missing, unexpected, mis-shaped or non-floating-point tensor raises an error naming it, its
file and what was expected; a file that cannot be read (config.json, generation_config.json, the shard
index, a shard) is named in its error.

Converted checkpoints (`save_converted`) never lose data: they are written into a temporary sibling and
renamed into place; replacing one (overwrite=True) switches to the new parameters with one atomic rename
of moejax_config.json, so the old checkpoint loads until the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from moejax import quantization
from moejax.capacity import MoEPolicy
from moejax.config import ModelConfig, from_hf_config, to_hf_config
from moejax.load_plan import Plan, unrun_prefixes, plan as load_plan
from moejax.models import with_expert_storage
from moejax.models.moe import check_expert_storage
from moejax.models.transformer import CausalLM

# Tensors a checkpoint may carry that moejax recomputes instead of reading.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_ORBAX_CONFIG = "moejax_config.json"
_CAUSAL_LM, _ENCODER_DECODER = "causal_lm", "encoder_decoder"  # its "model": which loader reads a converted one
_OWN_PARAMS = re.compile(r"params(-[0-9a-f]{12})?")  # the parameter directories save_converted names ("params": older)
_INDEX = "model.safetensors.index.json"
# The safetensors dtypes a weight may have; anything else (integers, bools, float8) is quantized or no weight:
# quantized formats are dequantized before the plan sees them (moejax.quantization).
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_json(file: str):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: not UTF-8 text ({e.reason})") from None


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory: config.json, with the token ids of
    generation_config.json where it has one (what transformers generates with)."""
    return _read_configs(path)[0]


def _read_configs(path: str) -> tuple[ModelConfig, dict]:
    """read_config's ModelConfig and config.json's own object (its quantization_config is read at load)."""
    return read_config_files(path, from_hf_config)


def read_config_files(path: str, parse: Callable[[dict, dict | None], object]) -> tuple[object, dict]:
    """(parse(config.json's object, generation_config.json's or None), config.json's object) of a checkpoint
    directory (moejax.seq2seq's reader too): every error names the file and the value it comes from."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    hf = _read_json(config_file)
    generation_file = os.path.join(path, "generation_config.json")
    generation = _read_json(generation_file) if os.path.isfile(generation_file) else None
    if generation is not None and not isinstance(generation, dict):
        raise ValueError(f"{generation_file} must hold a JSON object; got {type(generation).__name__}")
    try:
        return parse(hf, generation), hf
    except ValueError as e:
        file = generation_file if str(e).startswith("generation_config.json") else config_file
        raise ValueError(f"{e} (in {file})") from None
    except (TypeError, ZeroDivisionError, KeyError, IndexError, AttributeError) as e:  # a value of a kind no check foresaw
        raise ValueError(f"{config_file} holds a value moejax cannot read ({type(e).__name__}: {e})") from None


class _Tensors:
    """The tensors of model.safetensors, or else of the shards a model.safetensors.index.json names."""

    def __init__(self, path: str):
        index = os.path.join(path, _INDEX)
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):  # before an index, as transformers reads them
            self.file_of = {name: single for name in self._open(single).keys()}
        elif os.path.isfile(index):
            content = _read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index} has no 'weight_map' object (tensor name -> shard file name)")
            self.file_of = {name: self._shard(path, index, shard) for name, shard in weight_map.items()}
        else:
            found = sorted(os.listdir(path))
            hint = " (moejax reads safetensors only; convert .bin / .pt files first)" if any(
                n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
            raise FileNotFoundError(f"no model.safetensors or {_INDEX} in {path!r}; found {found}{hint}")
        self._handles: dict[str, object] = {}

    @staticmethod
    def _shard(path: str, index: str, shard: str) -> str:
        file = os.path.normpath(os.path.join(path, shard))
        if os.path.isabs(shard) or os.path.dirname(file) != os.path.normpath(path):
            raise ValueError(f"{index} names shard {shard!r}, which is not a file of the checkpoint directory")
        return file

    def _open(self, file: str, name: str | None = None):
        holding = "" if name is None else f" (holding {name!r})"
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint shard {file!r}{holding} is missing")
        try:
            return safe_open(file, "np")
        except SafetensorError as e:
            raise ValueError(f"checkpoint file {file!r}{holding} is not a readable safetensors file "
                             f"(truncated or corrupt?): {e}") from None

    def names(self) -> set[str]:
        return set(self.file_of)

    def _slice(self, name: str):
        handle = self._handle(name)
        try:
            return handle.get_slice(name)
        except SafetensorError:
            raise ValueError(f"tensor {name!r} is mapped to {self.file_of[name]!r}, which does not hold it "
                             f"(it holds {len(handle.keys())} other tensors): the shard index is wrong") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.file_of[name]!r}: {e}") from None

    def _handle(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file, name)
        return self._handles[file]


def load_pretrained(path: str, dtype="float32", policy: MoEPolicy | None = None, mesh=None,
                    gating: str | None = None, expert_storage: str = "stacked", **parallel_options) -> CausalLM:
    """A moejax model from a Hugging Face checkpoint directory (config.json + safetensors), or from a
    directory written by `save_converted`. Parameters are cast to `dtype` (a floating-point dtype) for
    either kind. With a `mesh` (moejax.parallel.make_mesh), the MoE blocks run expert-parallel on it with
    the given gating ("dynamic", the default, or "static") and options (see moejax.parallel.expert_parallel).
    expert_storage: how the MoE blocks hold their routed experts, "stacked" or "split" (faster decode on the
    CPU; see moejax.with_expert_storage), split one field of one block at a time once loaded (no second
    copy of the experts); with a mesh, each device's local experts split."""
    path = checkpoint_directory(path)
    dtype = _float_dtype(dtype)
    _check_policy(policy)
    check_expert_storage(expert_storage)
    if mesh is None:
        if gating is not None or parallel_options:
            given = dict(parallel_options, **({} if gating is None else {"gating": gating}))
            raise ValueError(f"load_pretrained: {sorted(given)} apply to expert parallelism and need a mesh= "
                             "(moejax.parallel.make_mesh())")
    else:
        from moejax import parallel

        if not isinstance(mesh, jax.sharding.Mesh):
            raise ValueError(f"mesh={mesh!r} must be a jax.sharding.Mesh (moejax.parallel.make_mesh())")
    model = _load(path, dtype, policy)
    for block in model.moe_blocks():  # the model is ours alone: each block's stacked experts go once split
        block.hold_experts(expert_storage)
    if mesh is not None:
        model = parallel.expert_parallel(model, mesh, "dynamic" if gating is None else gating, **parallel_options)
    return model


def checkpoint_directory(path) -> str:
    """`path` as a str, checked to be an existing directory (the first check of every loader)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path={path!r} must be a checkpoint directory (str or os.PathLike)")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist" if not os.path.exists(path)
                                else f"checkpoint path {path!r} is not a directory")
    return path


def _float_dtype(dtype) -> jnp.dtype:
    if dtype is None:  # jnp.dtype(None) is float64
        raise ValueError("dtype=None is not a floating-point dtype ('float32', 'bfloat16', 'float16')")
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype (e.g. 'float32', 'bfloat16')") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"dtype={dtype!r} must be a floating-point dtype ('float32', 'bfloat16', 'float16')")
    if d == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax_enable_x64 (JAX would silently compute in float32)")
    return d


def _check_policy(policy) -> None:
    if policy is not None and not isinstance(policy, MoEPolicy):
        raise ValueError(f"policy={policy!r} must be a moejax.MoEPolicy or None (dropless)")


def checkpoint_kind(directory: str) -> str | None:
    """What a directory holds: None (missing or empty), "converted" (save_converted), "huggingface"
    (config.json or safetensors), "both" (a converted checkpoint written into a Hugging Face one), "other"."""
    if not os.path.exists(directory):
        return None
    if not os.path.isdir(directory):
        return "other"
    names = os.listdir(directory)
    huggingface = any(n in ("config.json", _INDEX) or n.endswith(".safetensors") for n in names)
    converted = _ORBAX_CONFIG in names
    if huggingface and converted:
        return "both"
    return "huggingface" if huggingface else "converted" if converted else "other" if names else None


def _load(path: str, dtype, policy: MoEPolicy | None) -> CausalLM:
    kind = checkpoint_kind(path)
    if kind == "both":
        raise ValueError(f"{path!r} holds both a Hugging Face checkpoint and a converted one ({_ORBAX_CONFIG}, "
                         "params*): it is unclear which to load; move the converted one (moejax_config.json and "
                         "its params directory) elsewhere")
    if kind == "converted":
        return restore_converted(path, policy=policy, dtype=dtype)
    config, hf_config = _read_configs(path)
    model = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(0)))
    tensors = _Tensors(path)
    quantized = quantization.read_format(hf_config.get("quantization_config"))
    if quantized is not None:  # the plan sees float tensors under the unquantized names, each dequantized on read
        tensors = quantization.DequantizedTensors(tensors, quantized, dtype)
    names = tensors.names()
    tied_head = config.tie_word_embeddings and "lm_head.weight" in names
    unrun = unrun_prefixes(config)
    skipped = lambda name: bool(_IGNORED.match(name)) or (tied_head and name == "lm_head.weight") or name.startswith(unrun)
    fill_from_checkpoint(load_plan(model, names), tensors, path, config.architecture, skipped)
    return model


def fill_from_checkpoint(plan: Plan, tensors: _Tensors, path: str, architecture: str,
                         skipped: Callable[[str], bool]) -> None:
    """Set every parameter of `plan` from the checkpoint's tensors, after checking every name, shape and
    dtype the plan expects and every tensor the checkpoint holds (one the plan does not read is an error
    unless `skipped(name)`), all problems reported at once. Every loader's last step (encoder-decoder
    models' too: moejax.seq2seq.checkpoints)."""
    names = tensors.names()
    expected = dict(plan.sources())
    problems = []
    for name, shape in expected.items():
        if name not in names:
            problems.append(f"missing tensor {name!r} (expected shape {shape})")
            continue
        if tensors.shape(name) != shape:
            problems.append(f"tensor {name!r} has shape {tensors.shape(name)}, expected {shape}")
        if tensors.dtype(name) not in _FLOAT_DTYPES:
            problems.append(f"tensor {name!r} in {os.path.basename(tensors.file_of[name])} has dtype "
                            f"{tensors.dtype(name)}; weights must be floating point {_FLOAT_DTYPES} or in a quantized "
                            f"format config.json's quantization_config names ({', '.join(quantization.SUPPORTED_METHODS)})")
    for name in sorted(names - set(expected)):
        if not skipped(name):
            problems.append(f"unexpected tensor {name!r} with shape {tensors.shape(name)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"checkpoint {path!r} does not match its config.json ({architecture}):\n  {shown}")
    for item in plan.items:
        array = item.build(*(tensors.get(name) for name, _ in item.sources))
        # in the parameter's own dtype: `dtype`, but float32 where the model keeps one so (the router's score bias)
        item.param.set_value(jnp.asarray(array, dtype=item.param.get_value().dtype))


def load_tokenizer(path: str):
    """The checkpoint's tokenizer.json through the `tokenizers` library, or None where the checkpoint
    directory has none (a missing directory is an error, not None)."""
    file = os.path.join(checkpoint_directory(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
        raise ValueError(f"{file} is not a readable tokenizers file: {e}") from None


def save_converted(model, directory: str, *, overwrite: bool = False) -> None:
    """Write the converted parameters of a CausalLM or an encoder-decoder model (moejax.seq2seq) with orbax,
    plus the model config, for a fast `load_pretrained` (moejax's or moejax.seq2seq's, as for the model).

    Nothing is lost: `directory` must be new or empty, or (overwrite=True) hold an earlier converted
    checkpoint; a directory holding anything else, above all a Hugging Face checkpoint, is refused. The
    checkpoint is written complete into a temporary sibling first and then renamed into place; replacing
    an earlier one moves the new parameters beside the old ones and switches moejax_config.json with one
    atomic rename, so a save killed at any moment leaves the old checkpoint loadable (and at worst a
    `.NAME.partial-*` sibling or an unreferenced params-* directory, removed by the next overwrite)."""
    import orbax.checkpoint as ocp

    encoder_decoder = getattr(model, "is_encoder_decoder", False)
    if not (isinstance(model, CausalLM) or encoder_decoder):
        raise ValueError(f"save_converted needs a moejax CausalLM or EncoderDecoderLM; got {type(model).__name__}")
    if any(block.runtime.sharded for block in model.moe_blocks()):
        raise ValueError("save_converted needs the single-device model (expert weights are permuted on a mesh); "
                         "load the saved one with mesh= to run it expert-parallel")
    directory = os.path.abspath(os.fspath(directory))
    kind = checkpoint_kind(directory)
    if kind in ("huggingface", "both"):
        raise ValueError(f"{directory!r} holds a Hugging Face checkpoint (config.json / safetensors); "
                         "save_converted never writes into one: choose another directory")
    if kind == "other":
        raise FileExistsError(f"{directory!r} exists and holds no converted checkpoint; save_converted writes "
                              "only into a new or empty directory (or replaces a converted one, overwrite=True)")
    if kind == "converted" and not overwrite:
        raise FileExistsError(f"{directory!r} already holds a converted checkpoint; pass overwrite=True to "
                              "replace it (the old one stays loadable until the new one is complete)")
    staging, token = _staging_sibling(directory)
    try:
        params = f"params-{token}"
        _, state = nnx.split(with_expert_storage(model, "stacked"))  # one format on disk: load_pretrained splits
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(staging, params), state)
        _write_json_durably(os.path.join(staging, _ORBAX_CONFIG),
                            {"config": model.config.to_dict(), "dtype": model.dtype.name, "params": params,
                             "model": _ENCODER_DECODER if encoder_decoder else _CAUSAL_LM})
        if kind is None:
            os.rename(staging, directory)  # atomic; replaces an empty directory
            return
        os.rename(os.path.join(staging, params), os.path.join(directory, params))  # unreferenced until...
        os.replace(os.path.join(staging, _ORBAX_CONFIG), os.path.join(directory, _ORBAX_CONFIG))  # ...this switch
        for entry in os.listdir(directory):  # the old parameters, and any a killed save left unreferenced
            if _OWN_PARAMS.fullmatch(entry) and entry != params:
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_sibling(directory: str) -> tuple[str, str]:
    """(a new empty directory beside `directory`, named .NAME.partial-TOKEN, and TOKEN): where a save writes
    its files before renaming them into place (a rename within one file system is atomic)."""
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = os.path.join(parent, f".{name}.partial-{token}")
    os.mkdir(staging)  # not tempfile.mkdtemp: its mode 0700 would stay with the checkpoint after the rename
    return staging, token


def _write_json_durably(file: str, content, indent: int | None = None) -> None:
    with open(file, "w") as f:
        json.dump(content, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def restore_converted(directory: str, policy: MoEPolicy | None = None, dtype=None) -> CausalLM:
    """A checkpoint `save_converted` wrote of a CausalLM, its parameters cast to `dtype` (None: the dtype it
    was saved in)."""
    return restore_converted_model(directory, CausalLM, ModelConfig.from_dict, policy, dtype)


def restore_converted_model(directory: str, model_class, config_from_dict, policy: MoEPolicy | None = None,
                            dtype=None):
    """restore_converted for any model class: model_class(config, dtype=, policy=, rngs=) builds it and
    config_from_dict reads its config (moejax.seq2seq restores its EncoderDecoderLM through this)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    _check_policy(policy)
    config_file = os.path.join(directory, _ORBAX_CONFIG)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no converted checkpoint in {directory!r} (no {_ORBAX_CONFIG})")
    saved = _read_json(config_file)
    wanted = _ENCODER_DECODER if getattr(model_class, "is_encoder_decoder", False) else _CAUSAL_LM
    if isinstance(saved, dict) and saved.get("model", _CAUSAL_LM) != wanted:  # no "model": older causal-LM saves
        loader = "moejax.seq2seq.load_pretrained" if wanted == _CAUSAL_LM else "moejax.load_pretrained"
        raise ValueError(f"{config_file} holds a converted {saved['model']} model: load it with {loader}")
    try:
        config = config_from_dict(saved["config"])
        saved_dtype = jnp.dtype(saved["dtype"])
        params = os.path.join(directory, saved.get("params", "params"))  # "params": before atomic saves
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_file} is not a moejax converted-checkpoint config: {e!r}") from None
    dtype = saved_dtype if dtype is None else _float_dtype(dtype)
    build = lambda d: nnx.eval_shape(lambda: model_class(config, dtype=d, policy=policy, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(build(saved_dtype))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(params, abstract_state)
    if dtype != saved_dtype:
        graphdef, target_state = nnx.split(build(dtype))
        state = jax.tree.map(lambda value, want: jnp.asarray(value, want.dtype), state, target_state)
    return nnx.merge(graphdef, state)


def export_pretrained(model: CausalLM, directory: str, tokenizer=None, *, overwrite: bool = False) -> None:
    """Write `model` as a Hugging Face checkpoint of its family (config.json + model.safetensors, and the
    `tokenizers` tokenizer as tokenizer.json if given): the exact inverse of load_pretrained, which
    transformers loads too. Expert-parallel models are exported from their single-device originals.
    `directory` must be new or empty, or with overwrite=True is replaced whole; see write_checkpoint."""
    if any(block.runtime.sharded for block in model.moe_blocks()):
        raise ValueError("export_pretrained needs the single-device model (expert weights are permuted on a mesh)")
    model = with_expert_storage(model, "stacked")  # the checkpoint's tensors come from stacked experts
    mixtral = model.config.architecture == "mixtral"
    write_checkpoint(load_plan(model, _mixtral_names(model) if mixtral else set()),
                     to_hf_config(model.config, model.dtype), directory, tokenizer, overwrite=overwrite)


def write_checkpoint(plan: Plan, hf_config: dict, directory: str, tokenizer=None, *,
                     overwrite: bool = False) -> None:
    """Every tensor of `plan` split back into the checkpoint's own (model.safetensors), config.json, and the
    tokenizer as tokenizer.json if given: every export's last step (moejax.seq2seq.checkpoints' too).

    Nothing is lost and nothing stale is kept: `directory` must be new or empty; with overwrite=True a
    directory holding anything is replaced whole (a file left from the old checkpoint, a shard index above
    all, would be read in place of the new weights). The checkpoint is written complete into a temporary
    sibling first; then the old directory is moved aside, the new one renamed into place and the old one
    removed, so a save killed at any moment leaves the old checkpoint or the new one whole (at worst beside
    a `.NAME.partial-*` or `.NAME.replaced-*` sibling)."""
    from safetensors.numpy import save_file

    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory!r} is a file; export writes a checkpoint directory")
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise FileExistsError(f"{directory!r} is not empty ({shown}); export writes a new or empty directory, "
                              "or replaces this one whole with overwrite=True (the old one is kept until the "
                              "new one is complete)")
    tensors = {}
    for item in plan.items:
        value = np.asarray(jax.device_get(item.param.get_value()))
        for (name, shape), array in zip(item.sources, item.split(value)):
            assert array.shape == shape, (name, array.shape, shape)
            tensors[name] = np.ascontiguousarray(array)
    staging, token = _staging_sibling(directory)
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        _write_json_durably(os.path.join(staging, "config.json"), hf_config, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(staging, "tokenizer.json"))
        if not present:
            os.rename(staging, directory)  # atomic; replaces an empty directory
            return
        aside = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.replaced-{token}")
        os.rename(directory, aside)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(aside, directory)  # the old checkpoint back where it was
            raise
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mixtral_names(model: CausalLM) -> set[str]:
    """Mixtral checkpoints name their MoE blocks block_sparse_moe (the Hub layout transformers writes)."""
    return {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(model.config.num_layers)}
