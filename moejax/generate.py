"""Generation: one jitted prefill over left-padded prompts, then a jitted decode loop on a preallocated KV cache."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import stats
from moejax.experts import ExpertState
from moejax.config import is_integer
from moejax.models.transformer import CausalLM, check_positions, check_token_ids, init_cache

_PROMPT_BUCKET = 8  # prompts are left-padded to a multiple of this, so few prompt lengths compile


def pad_prompts(prompt, pad_id: int = 0, bucket: int = _PROMPT_BUCKET, vocab_size: int | None = None, *,
                right: bool = False, name: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """int [B, T] array or list of token lists -> left-padded (right=True: right-padded) int32 tokens [B, P]
    and a bool mask of real tokens. Every id goes through `check_token_ids` before anything is cast
    (vocab_size: the model's; None checks int32's range only, and the model checks its vocabulary); errors
    call the sequences `name` (encoder-decoder models pad their sources)."""
    if not is_integer(bucket) or bucket < 1:
        raise ValueError(f"bucket={bucket!r} must be an integer >= 1")
    if not is_integer(pad_id):
        raise ValueError(f"pad_id={pad_id!r} must be an integer")
    if isinstance(prompt, (list, tuple)) and prompt and not np.isscalar(prompt[0]):
        rows = [np.asarray(check_token_ids(p, vocab_size, ndim=1, name=f"{name} {i}", row=i))
                for i, p in enumerate(prompt)]
    else:
        rows = list(np.asarray(check_token_ids(prompt, vocab_size, name=f"{name} (int [batch, seq] or a list of "
                                                                         "token lists)")))
    empty = [i for i, r in enumerate(rows) if len(r) == 0]
    if not rows or empty:
        raise ValueError(f"every {name} needs at least one token; {name} {empty[0] if empty else 0} has none")
    length = -(-max(len(r) for r in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        where = slice(0, len(r)) if right else slice(length - len(r), length)
        tokens[i, where] = r
        mask[i, where] = True
    return tokens, mask


class Sampling(NamedTuple):
    """How the next token is drawn and when a row stops: validated once (`decoding`), shared by every
    decode loop (moejax.generate, buffered generation, decode statistics)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stops: tuple[int, ...]
    pad_token_id: int


def decoding(config, max_new_tokens, *, key=None, temperature=0.0, top_p=1.0, stop_tokens=None,
             pad_token_id=None) -> tuple[Sampling, jax.Array]:
    """Check a decode loop's arguments -> (Sampling, the PRNG key: key(0) where greedy needs none).

    stop_tokens None: the checkpoint's end-of-sequence ids (config.eos_token_id, read from
    generation_config.json or config.json), as transformers stops; () never stops early."""
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not _is_real(temperature) or not 0 <= temperature < np.inf:  # also refuses nan
        raise ValueError(f"temperature={temperature!r} must be >= 0 and finite (a number)")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (a number)")
    if key is not None and not _is_key(key):
        raise ValueError(f"key={key!r} must be a PRNG key (jax.random.key(seed))")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key: generate(..., key=jax.random.key(0))")
    if stop_tokens is None:
        # the checkpoint's own ids: one outside the vocabulary can never be drawn, so it is no stop at all
        stops = tuple(s for s in _token_list(config.eos_token_id, "config eos_token_id") if 0 <= s < config.vocab_size)
    else:
        stops = _token_list(stop_tokens, "stop_tokens")
        for s in stops:
            if not 0 <= s < config.vocab_size:
                raise ValueError(f"stop token {s} is outside the vocabulary [0, {config.vocab_size})")
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    if not is_integer(pad_token_id) or not -2**31 <= pad_token_id < 2**31:
        raise ValueError(f"pad_token_id={pad_token_id!r} must be an integer (int32)")
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p), stops, int(pad_token_id))
    return sampling, jax.random.key(0) if key is None else key


def _token_list(ids, name: str) -> tuple[int, ...]:
    """None, an int or a sequence of ints -> a tuple of ints (floats, bools and strings refused)."""
    if ids is None:
        return ()
    array = np.atleast_1d(np.asarray(ids, dtype=None if np.size(ids) else np.int64))
    if array.ndim != 1 or array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}={ids!r} must be a token id or a sequence of token ids (integers)")
    return tuple(int(s) for s in array.tolist())


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _is_key(key) -> bool:
    if not isinstance(key, jax.Array):
        return False
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return key.dtype == jnp.uint32 and key.shape == (2,)  # a raw jax.random.PRNGKey


def generate(model: CausalLM, prompt, max_new_tokens: int = 16, *, key: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] | int | None = None,
             cache_size: int | None = None, pad_token_id: int | None = None,
             forced_bos_token_id: int | None = None) -> jax.Array:
    """Generate `max_new_tokens` tokens after each prompt -> int32 [B, max_new_tokens].

    An encoder-decoder model (moejax.seq2seq) takes sources instead of prompts: its encoder runs once and
    the decoder generates from its start token; the tokens after the start token come back, the first of
    them `forced_bos_token_id` where given (NLLB's target-language token), as transformers forces it.

    Greedy by default (temperature 0). Sampling (temperature > 0, optionally nucleus top_p < 1) needs an
    explicit PRNG `key`. A row stops at a stop token: by default the checkpoint's end-of-sequence token
    (config.eos_token_id, from generation_config.json or config.json), as transformers does;
    `stop_tokens=()` never stops early. After it a row's remaining outputs are `pad_token_id` (default: the
    config's pad id, else the first stop token, else 0).
    """
    return decode(model, prompt, max_new_tokens, key=key, temperature=temperature, top_p=top_p,
                  stop_tokens=stop_tokens, cache_size=cache_size, pad_token_id=pad_token_id,
                  forced_bos_token_id=forced_bos_token_id).tokens


class Decoded(NamedTuple):
    tokens: jax.Array  # int32 [B, max_new_tokens]
    steps: jax.Array  # int32: forward calls after the prefill (fewer than max_new_tokens - 1 if all rows stopped)
    # record_loads: per forward call (the prefill first; calls not run are 0) and MoE layer, per expert:
    loads: jax.Array | None  # int32 [max_new_tokens, L, E]: pairs routed (before any policy)
    kept_loads: jax.Array | None  # int32 [max_new_tokens, L, E]: pairs computed
    predictions: jax.Array | None  # bool [max_new_tokens, L, E]: experts prefetched for the call (none: False)
    expert_states: object  # stateful experts backends' ExpertState after the last call (nnx.State)
    prefill_expert_states: object  # ... after the prefill


# Model kinds whose prefill is their own (moejax.seq2seq registers its encoder-decoder model): model class ->
# its decode(model, prompt, max_new_tokens, record_loads=, cache_size=, forced_bos_token_id=, **sampling).
_DECODERS: dict[type, Callable[..., "Decoded"]] = {}


def register_decoder(model_class: type, decode_fn: Callable[..., "Decoded"]) -> None:
    """Let `decode` (so `generate` and buffered generation) serve `model_class` through `decode_fn`, which
    runs its own prefill and then `decode_loop`."""
    _DECODERS[model_class] = decode_fn


def decode(model: CausalLM, prompt, max_new_tokens: int = 16, *, record_loads: bool = False,
           cache_size: int | None = None, forced_bos_token_id: int | None = None, **sampling) -> Decoded:
    """The decode loop behind `generate` (same arguments), optionally recording each decode step's expert
    loads: one jitted prefill over left-padded prompts, then a jitted while loop on a preallocated cache."""
    for kind, decode_fn in _DECODERS.items():
        if isinstance(model, kind):
            return decode_fn(model, prompt, max_new_tokens, record_loads=record_loads, cache_size=cache_size,
                             forced_bos_token_id=forced_bos_token_id, **sampling)
    if forced_bos_token_id is not None:
        raise ValueError("forced_bos_token_id applies to encoder-decoder models (moejax.seq2seq), whose decoder "
                         "starts from a start token; a decoder-only model continues its prompt")
    config = model.config
    sampling, key = decoding(config, max_new_tokens, **sampling)
    if cache_size is not None and (not is_integer(cache_size) or cache_size < 1):
        raise ValueError(f"cache_size={cache_size!r} must be an integer >= 1 (KV cache slots) or None")
    tokens, mask = pad_prompts(prompt, vocab_size=config.vocab_size)
    real_lengths = mask.sum(axis=1)
    # the last new token is never fed back: the positions run to prompt + max_new_tokens - 1
    check_positions(config, int(real_lengths.max()) + max_new_tokens - 1)
    needed = tokens.shape[1] + max_new_tokens
    if cache_size is None:
        cache_size = needed
    elif int(real_lengths.max()) + max_new_tokens > cache_size:
        raise ValueError(f"prompt of {int(real_lengths.max())} tokens + max_new_tokens={max_new_tokens} is longer "
                         f"than the cache ({cache_size} slots)")
    elif needed > cache_size:  # the cache fits the tokens but not our bucket padding: trim the padding
        trim = needed - cache_size
        tokens, mask = tokens[:, trim:], mask[:, trim:]
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key, sampling=sampling,
                   cache_size=cache_size, record_loads=record_loads)


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits float32 [B, V] -> int32 [B]: argmax if temperature == 0, else temperature / nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def next_tokens(logits: jax.Array, key: jax.Array, done: jax.Array, sampling: Sampling):
    """One step of every decode loop: logits [B, V] of the last position -> (tokens [B], next key, done [B]).
    Rows already done get the pad token; a row is done once it drew a stop token."""
    key, sub = jax.random.split(key)
    nxt = sample_next(logits, sub, sampling.temperature, sampling.top_p)
    nxt = jnp.where(done, sampling.pad_token_id, nxt)
    if sampling.stops:
        done = done | jnp.isin(nxt, jnp.asarray(sampling.stops, jnp.int32))
    return nxt, key, done


def expert_loads(routings, top_k: int, token_mask: jax.Array) -> jax.Array:
    """int32 [MoE layers, E]: routed (token, expert) pairs per expert of one forward call's real tokens."""
    return jnp.stack([stats.expert_counts(r, kept=False, token_mask=token_mask, top_k=top_k)
                      for r in routings if r is not None])


def _record(model, out, token_masks) -> tuple:
    """(routed, kept, predicted) per MoE block of one forward call (out.routings by layer); token_masks: per
    MoE block, the real tokens of its rows, or None for a block the call did not run (an encoder's in a
    decode step: zeros). See Decoded."""
    top_k = model.config.num_experts_per_tok
    routed, kept, predicted = [], [], []
    for block, mask in zip(model.moe_blocks(), token_masks):
        r = out.routings[block.layer]
        none = jnp.zeros((block.config.num_experts,), jnp.int32)
        routed.append(none if mask is None else stats.expert_counts(r, kept=False, token_mask=mask, top_k=top_k))
        kept.append(none if mask is None else stats.expert_counts(r))
        predicted.append(block.expert_state.get_value().prediction if block.prefetches else none.astype(bool))
    return jnp.stack(routed), jnp.stack(kept), jnp.stack(predicted)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("sampling", "cache_size", "record_loads"))
def _decode(graphdef, state, tokens, mask, key, *, sampling, cache_size, record_loads):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], cache_size, model.dtype)
    out = model.forward(tokens, token_mask=mask, cache=cache)

    def step(m, last, live, cache):
        out = m.forward(last[:, None], token_mask=live[:, None], cache=cache, decode=True)
        return out, [live] * len(m.moe_blocks())

    return decode_loop(model, out, [mask.reshape(-1)] * len(model.moe_blocks()), key, sampling, record_loads, step)


def decode_loop(model, out, token_masks, key, sampling: Sampling, record_loads: bool, step_fn) -> Decoded:
    """The one decode loop, inside a jitted function, after a model's prefill: `out` is the prefill's output
    (logits [B, T, V], the KV cache, routings by layer), token_masks its MoE blocks' real tokens (see
    _record); step_fn(model, last tokens [B], live rows [B], cache) -> (the next call's output, its token
    masks) runs one decode step. Rows that are done still run (static shapes) but as padding."""
    # stateful experts backends (buffered experts) update their ExpertState in the forward; the loop carries it
    graphdef, expert_states, rest = nnx.split(model, ExpertState, ...)
    expert_states = prefill_states = nnx.state(model, ExpertState)
    batch, steps = out.logits.shape[0], sampling.max_new_tokens
    first, key, done = next_tokens(out.logits[:, -1], key, jnp.zeros((batch,), bool), sampling)
    generated = jnp.full((batch, steps), sampling.pad_token_id, jnp.int32).at[:, 0].set(first)
    records = ()
    if record_loads:
        records = tuple(jnp.zeros((steps,) + a.shape, a.dtype).at[0].set(a) for a in _record(model, out, token_masks))

    def cond(carry):
        step, _, _, done, _, _, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, last, generated, done, cache, key, expert_states, records = carry
        m = nnx.merge(graphdef, expert_states, rest)
        # finished rows still run (static shapes) but as padding: no cache slot, no expert slot
        out, masks = step_fn(m, last, ~done, cache)
        if record_loads:
            records = tuple(r.at[step].set(a) for r, a in zip(records, _record(m, out, masks)))
        nxt, key, done = next_tokens(out.logits[:, -1], key, done, sampling)
        generated = jax.lax.dynamic_update_slice_in_dim(generated, nxt[:, None], step, axis=1)
        return step + 1, nxt, generated, done, out.cache, key, nnx.state(m, ExpertState), records

    cache = out.cache._replace(index=jnp.asarray(out.cache.index, jnp.int32))  # static after prefill; a loop carry now
    carry = (jnp.ones((), jnp.int32), first, generated, done, cache, key, expert_states, records)
    step, _, generated, _, _, _, expert_states, records = jax.lax.while_loop(cond, body, carry)
    loads, kept, predicted = records if record_loads else (None,) * 3
    return Decoded(generated, step - 1, loads, kept, predicted, expert_states, prefill_states)
