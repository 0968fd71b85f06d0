"""A whole training run of a small NLLB-MoE-architecture translation model: pairs (moejax.data.function_pairs
of a corpus: code -> its docstring's summary) -> a shared BPE tokenizer -> the data-parallel steps of
moejax.training with the sequence-to-sequence loss, validated and checkpointed like the language model's."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flax import nnx

from moejax import data, translation
from moejax.training.losses import seq2seq_loss
from moejax.training.run import (check_resume, check_splits, check_training_config, loss_weights, optimizer,
                                 train_loop, workdir_tokenizer)
from moejax.training.trainer import Trainer, data_mesh


class PairCorpus(NamedTuple):
    tokenizer: object  # tokenizers.Tokenizer
    splits: dict  # split name -> list of data.Pair


def prepare_pairs(config, workdir: str) -> PairCorpus:
    """The pairs of config.corpus split by document; the tokenizer trained on the train split, or reused
    from workdir/tokenizer.json (so that a resumed run sees the same token ids)."""
    pairs = data.function_pairs(data.load_documents(config.corpus))
    splits = data.split_pairs(pairs, config.validation_fraction, config.test_fraction)
    check_splits(config, splits, f"{len(pairs)} function / docstring pairs")
    return PairCorpus(workdir_tokenizer(workdir, lambda: translation.train_tokenizer(splits["train"], config.vocab_size)),
                      splits)


def nllb_moe_config(m, vocab_size: int, max_positions: int) -> dict:
    """The nllb-moe config.json of config.model `m` (as NllbMoeConfig names it; the special tokens at
    translation.SPECIAL_TOKENS' ids, NLLB's own): what the model is built from and exported as."""
    return {
        "model_type": "nllb-moe", "architectures": ["NllbMoeForConditionalGeneration"], "is_encoder_decoder": True,
        "vocab_size": vocab_size, "d_model": m.hidden_size, "encoder_layers": m.num_layers,
        "decoder_layers": m.num_layers, "encoder_attention_heads": m.num_heads, "decoder_attention_heads": m.num_heads,
        "encoder_ffn_dim": m.ffn_dim, "decoder_ffn_dim": m.ffn_dim, "encoder_sparse_step": m.sparse_step,
        "decoder_sparse_step": m.sparse_step, "num_experts": m.num_experts, "activation_function": "relu",
        "max_position_embeddings": max_positions, "scale_embedding": True, "tie_word_embeddings": True,
        "router_bias": False, "router_dtype": "float32", "second_expert_policy": "all",
        "router_ignore_padding_tokens": False, "moe_token_dropout": 0.0,
        # NLLB's eval capacity: a fraction of the batch's tokens per expert (1.0: never binds)
        "moe_eval_capacity_token_fraction": m.eval_capacity_fraction, "expert_capacity": 64,
        "normalize_router_prob_before_dropping": False, "batch_prioritized_routing": False,
        **{name: i for i, name in enumerate(("bos_token_id", "pad_token_id", "eos_token_id"))},
        "decoder_start_token_id": 2,
    }


def build_model(config, tokenizer):
    from moejax.seq2seq import EncoderDecoderLM, from_hf_config

    hf = nllb_moe_config(config.model, tokenizer.get_vocab_size(),
                         max(config.max_source_tokens, config.max_target_tokens + 1))
    return EncoderDecoderLM(from_hf_config(hf), rngs=nnx.Rngs(config.seed))


def run(config, workdir: str, progress: bool = True, devices=None, stop_after: int | None = None) -> dict:
    """Train per `config` (configs/train_mt.py) in `workdir`, resuming from its latest checkpoint; as
    moejax.training.run for the language model. Returns {"model", "tokenizer", "pairs", "history", "state"}."""
    check_training_config(config)
    check_resume(config, workdir)
    corpus = prepare_pairs(config, workdir)
    model = build_model(config, corpus.tokenizer)
    encode = lambda split: translation.encode_pairs(corpus.tokenizer, corpus.splits[split], model.config,
                                                    config.max_source_tokens, config.max_target_tokens)
    train, validation = encode("train"), encode("validation")
    trainer = Trainer(model, optimizer(config), loss_weights(config), data_mesh(devices), config.compute_dtype,
                      config.capacity_factor, loss=seq2seq_loss)
    rows = min(len(validation.source), config.eval_pairs)
    rows -= rows % trainer.mesh.size
    if not rows:
        raise ValueError(f"the validation split has fewer than {trainer.mesh.size} pairs (one per device)")
    held_out = validation.rows(slice(0, rows))
    batch = lambda step: translation.training_batch(train, config.seed, step, config.batch_size)
    state, history, steps = train_loop(config, workdir, trainer, batch, held_out, progress, stop_after)
    return {"model": trainer.model(state), "tokenizer": corpus.tokenizer, "pairs": corpus.splits,
            "history": history, "state": state, "steps_this_call": steps}
