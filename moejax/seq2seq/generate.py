"""Generation with an encoder-decoder model: the encoder once over the right-padded sources, the
cross-attention keys and values once, then moejax.generate's own decode loop (`decode_loop`) over the
decoder with a preallocated self-attention cache. Registered with moejax.generate, so `moejax.generate`,
`moejax.generate.decode(record_loads=True)` and buffered generation serve both model kinds.

Every decoder call takes one token per row (the start token, then each new token), so MoE policies see
them as decode steps (decode=True: MoEPolicy.in_decode applies). The family's own capacity applies as
transformers computes it in each call; rows that are done run as padding, which takes no expert slot
(transformers routes the pad tokens it feeds them: a capacity that binds can differ after a row stops).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.generate import Decoded, decode_loop, decoding, pad_prompts, register_decoder
from moejax.config import is_integer
from moejax.seq2seq.model import EncoderDecoderLM


def start_token(config) -> int:
    """The decoder's first input: decoder_start_token_id, else bos_token_id (transformers' fallback)."""
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    if start is None:
        raise ValueError(f"{config.architecture}: the config names no decoder_start_token_id (nor bos_token_id) to "
                         "start the decoder from")
    if not 0 <= start < config.vocab_size:
        raise ValueError(f"decoder start token {start} is outside the vocabulary [0, {config.vocab_size})")
    return int(start)


def decode(model: EncoderDecoderLM, sources, max_new_tokens: int = 16, *, record_loads: bool = False,
           cache_size: int | None = None, forced_bos_token_id: int | None = None,
           **sampling) -> Decoded:
    """moejax.generate.decode for an encoder-decoder model: `sources` int [B, S] or token lists of different
    lengths (right-padded with the pad token, every id checked); the tokens after the start token come back
    (the first one `forced_bos_token_id` where given). cache_size: decoder self-attention slots (default
    max_new_tokens, all a generation needs). Loads (record_loads) are per forward call: the prefill (the
    encoder and the decoder's first step), then each decode step, whose encoder MoE layers are zeros."""
    config = model.config
    sampling, key = decoding(config, max_new_tokens, **sampling)
    start = start_token(config)
    if forced_bos_token_id is not None and not (is_integer(forced_bos_token_id)
                                                and 0 <= forced_bos_token_id < config.vocab_size):
        raise ValueError(f"forced_bos_token_id={forced_bos_token_id!r} must be a token id in the vocabulary "
                         f"[0, {config.vocab_size})")
    if cache_size is None:
        cache_size = max_new_tokens
    elif not is_integer(cache_size) or cache_size < max_new_tokens:
        raise ValueError(f"cache_size={cache_size!r} must be an integer >= max_new_tokens={max_new_tokens} (the "
                         "decoder's self-attention slots: the start token and every fed-back token)")
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    tokens, mask = pad_prompts(sources, pad_id=pad, bucket=1, vocab_size=config.vocab_size, right=True,
                                            name="source")
    model.check_lengths(np.where(mask, tokens, pad), max_new_tokens)
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key, sampling=sampling,
                   cache_size=int(cache_size), start=start,
                   forced=None if forced_bos_token_id is None else int(forced_bos_token_id), record_loads=record_loads)


def force_token(logits: jax.Array, token: int) -> jax.Array:
    """logits [B, T, V] whose last position can only draw `token` (transformers' forced BOS)."""
    last = jnp.where(jnp.arange(logits.shape[-1]) == token, logits[:, -1], -jnp.inf)
    return logits.at[:, -1].set(last)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("sampling", "cache_size", "start", "forced", "record_loads"))
def _decode(graphdef, state, sources, source_mask, key, *, sampling, cache_size, start, forced, record_loads):
    model = nnx.merge(graphdef, state)
    batch = sources.shape[0]
    encoded = model.encode(sources, source_mask)
    cross = model.cross_keys_values(encoded.hidden)
    blocks = model.moe_blocks()
    in_encoder = [block.layer < model.config.encoder_layers for block in blocks]
    first = jnp.full((batch, 1), start, jnp.int32)
    out = model.decoder_forward(first, cross, source_mask, cache=model.init_cache(batch, cache_size), decode=True)
    out = out._replace(encoder_routings=encoded.routings)
    if forced is not None:
        out = out._replace(logits=force_token(out.logits, forced))
    live = jnp.ones((batch,), bool)
    masks = [source_mask.reshape(-1) if encoder else live for encoder in in_encoder]

    def step(m, last, live, cache):
        out = m.decoder_forward(last[:, None], cross, source_mask, token_mask=live[:, None], cache=cache, decode=True)
        return out, [None if encoder else live for encoder in in_encoder]

    return decode_loop(model, out, masks, key, sampling, record_loads, step)


register_decoder(EncoderDecoderLM, decode)
