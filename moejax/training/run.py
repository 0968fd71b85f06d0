"""A whole training run: corpus -> tokenizer -> data-parallel steps with periodic validation and orbax
checkpoints; the batch of step i depends only on (seed, i), so an interrupted run resumes exactly."""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import numpy as np
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.transformer import CausalLM
from moejax.results import read_json, write_json_atomically
from moejax.training.losses import LossTerms, LossWeights
from moejax.training.trainer import Checkpoints, Trainer, data_mesh, make_optimizer


def model_config(architecture: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 max_position_embeddings: int, tie_word_embeddings: bool = False, rope_theta: float = 10000.0,
                 eos_token_id: int | None = None) -> ModelConfig:
    """The ModelConfig of an all-MoE model of a family that export_pretrained can write (OLMoE or Mixtral)."""
    from moejax.config import RopeConfig

    if architecture not in ("olmoe", "mixtral"):
        raise ValueError(f"architecture={architecture!r}: training builds 'olmoe' or 'mixtral' models")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    olmoe = architecture == "olmoe"
    return ModelConfig(
        architecture=architecture, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=rope_theta), max_position_embeddings=max_position_embeddings,
        qk_norm=olmoe, tie_word_embeddings=tie_word_embeddings, intermediate_size=moe_intermediate_size,
        moe_layers=(True,) * num_layers, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size, norm_topk_prob=not olmoe,  # as Mixtral / OLMoE-1B-7B bos_token_id=None,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id)



class Corpus(NamedTuple):
    tokenizer: object  # tokenizers.Tokenizer
    splits: dict  # split name -> list of data.Document
    train_stream: np.ndarray  # int32 train tokens, documents separated by END_OF_DOCUMENT
    validation_stream: np.ndarray


def prepare_corpus(config, workdir: str) -> Corpus:
    """Read and split config.corpus; train the tokenizer on the train split, or reuse workdir/tokenizer.json
    (so that a resumed run sees the same token ids)."""
    from moejax import data

    documents = data.load_documents(config.corpus)
    splits = data.split_documents(documents, config.validation_fraction, config.test_fraction)
    check_splits(config, splits, f"{len(documents)} documents")
    tokenizer = workdir_tokenizer(workdir, lambda: data.train_tokenizer((d.text for d in splits["train"]),
                                                                        config.vocab_size))
    separator = tokenizer.token_to_id(data.END_OF_DOCUMENT)
    streams = [data.token_stream(data.encode_documents(tokenizer, splits[s]), separator)
               for s in ("train", "validation")]
    return Corpus(tokenizer, splits, *streams)


def check_splits(config, splits: dict, what: str) -> None:
    for name in ("train", "validation"):
        if not splits[name]:
            raise ValueError(f"corpus {config.corpus!r} ({what}) leaves the {name} split empty; add documents or "
                             "change the split fractions")


def workdir_tokenizer(workdir: str, train):
    """workdir/tokenizer.json where an earlier call left one (a resumed run sees the same token ids), else
    train() saved there."""
    from tokenizers import Tokenizer

    path = os.path.join(workdir, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    tokenizer = train()
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(path)
    return tokenizer


def build_model(config, tokenizer) -> CausalLM:
    """The freshly initialised model of config.model, sized to the tokenizer's vocabulary."""
    from moejax import data

    m = config.model
    architecture = model_config(
        m.architecture, tokenizer.get_vocab_size(), m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
        m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, eos_token_id=tokenizer.token_to_id(data.END_OF_DOCUMENT))
    return CausalLM(architecture, rngs=nnx.Rngs(config.seed))


def run(config, workdir: str, progress: bool = True, devices=None, stop_after: int | None = None) -> dict:
    """Train per `config` in `workdir`, resuming from its latest checkpoint if there is one; `stop_after`
    ends the call after that step (checkpointed), as an interruption would, without changing the schedule.

    The batch of step i is a function of (config.seed, i) only, so an interrupted run continues exactly as an
    uninterrupted one would; a resume with other settings is refused (check_resume). Returns {"model",
    "tokenizer", "corpus", "history", "state", "steps_this_call"}: history holds, per step of the whole run,
    the training loss terms, and per validation, the validation cross-entropy."""
    from moejax import data

    check_training_config(config)
    if config.sequence_length > config.model.max_position_embeddings:
        raise ValueError(f"config.sequence_length={config.sequence_length} is longer than the model's "
                         f"config.model.max_position_embeddings={config.model.max_position_embeddings}")
    check_resume(config, workdir)
    corpus = prepare_corpus(config, workdir)
    trainer = Trainer(build_model(config, corpus.tokenizer), optimizer(config), loss_weights(config),
                      data_mesh(devices), config.compute_dtype, config.capacity_factor)
    validation = np.stack([c for c in data.chunks(corpus.validation_stream, config.sequence_length + 1,
                                                  config.eval_sequences) if len(c) == config.sequence_length + 1])
    validation = validation[:len(validation) - len(validation) % trainer.mesh.size]
    if not len(validation):
        raise ValueError(f"the validation split has fewer than {config.sequence_length + 1} * {trainer.mesh.size} "
                         "tokens; lower sequence_length or add documents")
    batch = lambda step: (data.training_batch(corpus.train_stream, config.seed, step, config.batch_size,
                                              config.sequence_length),)
    state, history, steps = train_loop(config, workdir, trainer, batch, (validation,), progress, stop_after)
    return {"model": trainer.model(state), "tokenizer": corpus.tokenizer, "corpus": corpus, "history": history,
            "state": state, "steps_this_call": steps}


_POSITIVE = ("steps", "batch_size", "sequence_length", "eval_every", "checkpoint_every", "eval_sequences",
             "eval_pairs", "max_source_tokens", "max_target_tokens", "vocab_size")
# settings a resumed run may change: when it validates and checkpoints, not what it trains
_RESUMABLE = ("eval_every", "checkpoint_every")
_RUN_SETTINGS = "run_settings.json"


def check_training_config(config) -> None:
    """The training settings (configs/train_*.py) checked before any work: each bad one named."""
    import jax.numpy as jnp

    for name in _POSITIVE:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config.{name}={value!r} must be an integer >= 1")
    warmup = config.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= config.steps:
        raise ValueError(f"config.warmup_steps={warmup!r} must be an integer in [0, config.steps={config.steps}]")
    try:
        dtype = jnp.dtype(config.compute_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r} must be a floating-point dtype "
                         "('float32', 'bfloat16')")


def check_resume(config, workdir: str) -> None:
    """A first call records its settings in workdir/run_settings.json; a later one (a resume) must have the
    same, but for when it validates and checkpoints (_RESUMABLE): other settings would train the rest of the
    run on other data, another schedule, another tokenizer or another model, and its results would say they
    trained it all."""

    settings = {k: v for k, v in json.loads(config.to_json()).items() if k not in _RESUMABLE}
    path = os.path.join(workdir, _RUN_SETTINGS)
    recorded = read_json(path)
    if recorded is not None and recorded != settings:  # its tokenizer.json and checkpoints are that run's
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise ValueError(f"{workdir!r} holds a run started with other settings ({', '.join(changed)} differ, "
                         f"recorded in {path}): resume it with those, or train in a new workdir")
    if recorded is None:  # a first call (or a workdir from before this record: nothing to compare with)
        os.makedirs(workdir, exist_ok=True)
        write_json_atomically(path, settings)


def optimizer(config):
    return make_optimizer(config.learning_rate, config.warmup_steps, config.steps, config.weight_decay)


def loss_weights(config) -> LossWeights:
    return LossWeights(config.load_balance_coef, config.router_z_coef)


def train_loop(config, workdir: str, trainer: Trainer, batch, validation: tuple, progress: bool = True,
               stop_after: int | None = None):
    """Steps from workdir's latest checkpoint (or the start) to config.steps (or stop_after): batch(step) ->
    the step's batch tuple; validated on `validation` every config.eval_every steps and at the end;
    checkpointed every config.checkpoint_every, with the run's history so far (workdir/history.json, so a
    resumed run reports every step). -> (state, history of the whole run, steps taken in this call)."""
    from tqdm import tqdm

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint_every)
    state = trainer.init()
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
    start = int(state.step)
    history_file = os.path.join(workdir, "history.json")
    earlier = read_json(history_file) or {}  # up to the checkpoint restored (later steps are taken again)
    history = {kind: [h for h in earlier.get(kind, []) if h["step"] <= start] for kind in ("train", "validation")}
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress,
               desc="train", unit="step")
    clock = None
    for step in bar:
        inputs = batch(step)
        state, terms = trainer.step(state, *inputs)
        terms = LossTerms(*(float(t) for t in terms))  # waits for the step: honest timing
        now = time.perf_counter()
        tokens = sum(np.asarray(a).size for a in inputs if np.asarray(a).dtype != bool)  # token ids, padding too
        rate = tokens / (now - clock) if clock is not None else None  # the first step compiles
        clock = now
        history["train"].append({"step": step + 1, **terms._asdict(), "tokens_per_s": rate})
        bar.set_postfix(loss=f"{terms.cross_entropy:.3f}", tok_s=f"{rate or 0:,.0f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            ce = float(trainer.evaluate(state, *validation).cross_entropy)
            history["validation"].append({"step": step + 1, "cross_entropy": ce, "perplexity": float(np.exp(ce))})
            bar.write(f"step {step + 1}: validation cross-entropy {ce:.4f} (perplexity {np.exp(ce):.2f})")
        checkpoints.save(state, force=step + 1 == end)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
            write_json_atomically(history_file, history)
    checkpoints.close()
    return state, history, max(0, end - start)
