"""Quality: perplexity over token sequences, multiple-choice log-likelihood tasks (lm-eval style), and the
routing statistics of a model on a corpus; batched and padded correctly (padding excluded everywhere).

Every function takes any model that load_pretrained returns."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moejax.data import read_jsonl
from moejax.generate import pad_prompts
from moejax.models.transformer import CausalLM, check_positions, check_token_ids


@functools.partial(jax.jit, static_argnums=0)
def _token_log_likelihoods(graphdef, state, tokens, mask):
    """Sum of log p(token | prefix) over real next tokens, and their count, for one padded batch."""
    logits = nnx.merge(graphdef, state).forward(tokens, token_mask=mask).logits
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logprobs, target[..., None], axis=-1)[..., 0]
    counted = mask[:, 1:] & mask[:, :-1]
    return jnp.where(counted, picked, 0.0).sum(), counted.sum()


def perplexity(model: CausalLM, sequences: Iterable[Sequence[int]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each sequence.

    Sequences are left-padded into batches (lengths bucketed so that few shapes compile); padding neither
    predicts nor is predicted, and is excluded from routing and capacity as everywhere in moejax. Under a
    capacity policy the tokens of one batch compete for expert slots, so the result depends on batch_size:
    report it with the number.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    sequences = [list(s) for s in sequences]
    if not sequences or all(len(s) < 2 for s in sequences):
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    # outside jit (inside, the forward's own check sees tracers): warn past the trained positions, refuse
    # longrope's long regime, as model() and generate do
    check_positions(model.config, max(len(s) for s in sequences))
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = [s for s in sequences[start:start + batch_size] if len(s) >= 2]
        if not batch:
            continue
        tokens, mask = pad_prompts(batch)
        ll, n = _token_log_likelihoods(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
        total += float(ll)
        count += int(n)
    return math.exp(-total / count)


# ---------------------------------------------------------------------------------------------------------
# Per-token log-likelihoods, batched: the building block of multiple-choice scoring.


def bucket_length(length: int, smallest: int = 16) -> int:
    """Padded length for a batch whose longest row has `length` tokens: the next power of two (at least
    `smallest`), so that a whole evaluation compiles only a handful of shapes."""
    return max(smallest, 1 << max(0, length - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scored_batch(graphdef, state, inputs, targets, mask, with_routings):
    """For one left-padded batch: log p(targets[:, t] | inputs[:, :t+1]) float32 [B, T], whether each target
    is the argmax there bool [B, T], and the forward's routings when asked for."""
    out = nnx.merge(graphdef, state).forward(inputs, token_mask=mask)
    logprobs = jax.nn.log_softmax(out.logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logprobs, axis=-1) == targets
    return jnp.where(mask, picked, 0.0), greedy | ~mask, out.routings if with_routings else None


class ScoredContinuations(NamedTuple):
    log_likelihoods: np.ndarray  # float64 [N]: log p(continuation | context)
    greedy: np.ndarray  # bool [N]: every continuation token is the argmax after its prefix (lm-eval's is_greedy)
    loads: dict | None  # with_loads: {MoE layer: stats.LayerLoads} summed over every batch


def score_continuations(model: CausalLM, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 16, max_length: int | None = None, with_loads: bool = False,
                        progress: str | None = None) -> ScoredContinuations:
    """Each (context ids, continuation ids) request scored as lm-eval's Hugging Face backend scores it: of
    context + continuation, the last max_length + 1 tokens are kept (the context is cut from the left) and all
    but the last are fed to the model, which predicts the continuation's tokens; max_length defaults to the
    model's max_position_embeddings. with_loads: also the per-layer expert loads of those forwards, padding
    and filler rows excluded (what the policy enforced). progress: a progress bar over the batches, so named.

    Requests are sorted by length, left-padded to bucketed lengths and run in batches of a fixed size (the
    last filled with fully masked rows), so compiled shapes are few. Under a capacity policy the rows of a
    batch compete for expert slots: the result depends on batch_size and on which requests are scored
    together (report them with the numbers)."""
    from moejax import stats

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    limit = model.config.max_position_embeddings if max_length is None else max_length
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_length={max_length!r} must be an integer >= 1 (or None: the model's positions)")
    rows, lengths = [], []
    for i, (context, continuation) in enumerate(requests):
        if not len(context):
            raise ValueError(f"request {i}: the context is empty (at least one token must precede the continuation)")
        if not len(continuation):
            raise ValueError(f"request {i}: the continuation is empty")
        if len(continuation) > limit:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens does not fit max_length={limit}")
        row = np.asarray(check_token_ids(list(context) + list(continuation), model.config.vocab_size, ndim=1,
                                         name=f"request {i}"))
        rows.append(row[-(limit + 1):].tolist())
        lengths.append(len(continuation))
    if rows:  # the positions fed (all but each row's last token), checked outside jit as perplexity's
        check_positions(model.config, max(len(r) for r in rows) - 1)
    graphdef, state = nnx.split(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores, greedy, loads = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool), {} if with_loads else None
    for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None):
        index = order[start:start + batch_size]
        batch = [rows[i] for i in index] + [[0, 0]] * (batch_size - len(index))
        bucket = min(bucket_length(max(len(r) - 1 for r in batch)), limit)
        inputs, mask = pad_prompts([r[:-1] for r in batch], bucket=bucket)
        targets, _ = pad_prompts([r[1:] for r in batch], bucket=bucket)
        mask[len(index):] = False  # filler rows: padding everywhere, so they take no expert slot
        picked, hit, routings = _scored_batch(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                              jnp.asarray(mask), with_loads)
        picked, hit = np.asarray(picked, np.float64), np.asarray(hit)
        for row, i in enumerate(index):
            scores[i] = picked[row, picked.shape[1] - lengths[i]:].sum()
            greedy[i] = hit[row, hit.shape[1] - lengths[i]:].all()
        if with_loads:
            loads = add_loads(loads, stats.layer_loads(routings, jnp.asarray(mask), model.config.num_experts_per_tok))
    return ScoredContinuations(scores, greedy, loads)


def add_loads(total: dict, loads: dict) -> dict:
    """{MoE layer: stats.LayerLoads} + {MoE layer: stats.LayerLoads} -> their per-layer sums (a new dict)."""
    out = dict(total)
    for layer, l in loads.items():
        out[layer] = l if layer not in out else type(l)(*(a + b for a, b in zip(out[layer], l)))
    return out


def continuation_log_likelihoods(model: CausalLM, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                                 batch_size: int = 16) -> np.ndarray:
    """float64 [N]: log p(continuation | context) for each (context ids, continuation ids) request, batched and
    truncated as `score_continuations` does (a request past max_position_embeddings keeps its last tokens)."""
    return score_continuations(model, requests, batch_size).log_likelihoods


# ---------------------------------------------------------------------------------------------------------
# Multiple-choice tasks in the lm-eval style: JSONL lines {"context": str, "choices": [str, ...], "gold": int}.


class MultipleChoice(NamedTuple):
    context: str
    choices: tuple[str, ...]
    gold: int


def read_multiple_choice(path: str) -> list[MultipleChoice]:
    """Examples from a JSONL task file; a malformed line fails naming the file and line number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"multiple-choice task file {path!r} does not exist")
    examples = []
    for line_number, record in read_jsonl(path):
        try:
            examples.append(_example(record))
        except ValueError as e:
            raise ValueError(f"{path}:{line_number}: {e}") from None
    if not examples:
        raise ValueError(f"multiple-choice task file {path!r} holds no examples")
    return examples


def _example(record) -> MultipleChoice:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str):
        raise ValueError(f"'context' must be a string, got {context!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"'choices' must be a list of two or more non-empty strings, got {choices!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"'gold'={gold!r} is not an index into the {len(choices)} choices")
    return MultipleChoice(context, tuple(choices), gold)


def write_multiple_choice(examples: Sequence[MultipleChoice], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"context": e.context, "choices": list(e.choices), "gold": e.gold}) + "\n")


def score_multiple_choice(model: CausalLM, tokenizer, examples: Sequence[MultipleChoice],
                          batch_size: int = 16, encode_pair=None) -> dict:
    """lm-eval's multiple-choice metrics: acc (the choice of highest log-likelihood given the context is
    gold), acc_norm (the same with log-likelihoods divided by each choice's length in characters), and the
    chance level (mean of 1 / number of choices). Context and choice are tokenised separately and joined,
    unless encode_pair(context, choice) -> (context ids, choice ids) says otherwise (lm-eval's backends
    encode the pair together: moejax.lm_eval_model.MoejaxLM._encode_pair gives its requests exactly)."""
    requests, owners = [], []
    for i, e in enumerate(examples):
        _example({"context": e.context, "choices": list(e.choices), "gold": e.gold})  # the checks a file gets
        context = tokenizer.encode(e.context).ids
        for choice in e.choices:
            # a choice continues the context: no special tokens of its own (a tokenizer that prepends a BOS
            # would score log p(BOS | context) and condition the choice on it), as lm-eval encodes continuations
            requests.append((context, tokenizer.encode(choice, add_special_tokens=False).ids) if encode_pair is None
                            else encode_pair(e.context, choice))
            owners.append(i)
    scores = continuation_log_likelihoods(model, requests, batch_size=batch_size)
    correct, correct_norm, chance, start = 0, 0, 0.0, 0
    for e in examples:
        ll = scores[start:start + len(e.choices)]
        start += len(e.choices)
        correct += int(np.argmax(ll)) == e.gold
        correct_norm += int(np.argmax(ll / np.asarray([len(c) for c in e.choices], np.float64))) == e.gold
        chance += 1 / len(e.choices)
    n = len(examples)
    if not n:
        raise ValueError("score_multiple_choice needs at least one example")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "chance": chance / n, "examples": n}


CONTINUATION_UNITS = ("word", "line")
_WORD = re.compile(r" [A-Za-z_][A-Za-z_0-9]*")


def continuation_task(texts: Sequence[str], num_examples: int, num_choices: int = 4, context_chars: int = 400,
                      seed: int = 0, unit: str = "word", min_chars: int = 4, max_chars: int = 100) -> list[MultipleChoice]:
    """A held-out "what comes next" task built from `texts`: the context is up to `context_chars` characters
    of a text, the gold choice is what follows it there, the other choices are drawn from the other texts.

    unit "word": the next identifier (with its leading space, as byte-level BPE tokenises it), cut inside a
    line at one random such word per line; unit "line": the next line, with the newline before it (so that
    "\n" plus indentation tokenise as in training). Choices are min_chars..max_chars characters long, and
    a distractor is 0.8-1.25x the gold's length (log-likelihoods are sums, so length alone must not decide)
    and never equal to it. Deterministic in (texts, seed)."""
    if num_choices < 2:
        raise ValueError(f"num_choices={num_choices} must be >= 2")
    if unit not in CONTINUATION_UNITS:
        raise ValueError(f"unit={unit!r}; supported: {CONTINUATION_UNITS}")
    rng = np.random.default_rng(seed)
    candidates = []  # (text index, where the context ends, continuation)
    for t, text in enumerate(texts):
        offset = 0
        for line in text.split("\n"):
            if offset >= max(1, context_chars // 4):
                if unit == "line":
                    if min_chars <= len(line.strip()) and len(line) < max_chars:
                        candidates.append((t, offset - 1, "\n" + line))
                else:
                    indent = len(line) - len(line.lstrip())
                    words = [m for m in _WORD.finditer(line, indent) if min_chars <= len(m.group()) <= max_chars]
                    if words:
                        word = words[rng.integers(len(words))]
                        candidates.append((t, offset + word.start(), word.group()))
            offset += len(line) + 1
    if len({t for t, _, _ in candidates}) < 2:
        raise ValueError("continuation_task needs at least two texts with usable continuations")
    examples = []
    for index in rng.permutation(len(candidates)):
        if len(examples) == num_examples:
            break
        t, cut, gold_choice = candidates[index]
        distractors = []
        for _ in range(100 * num_choices):  # bounded: a small corpus may not have enough fitting choices
            other_t, _, choice = candidates[rng.integers(len(candidates))]
            if (other_t != t and choice.strip() != gold_choice.strip() and choice not in distractors
                    and 0.8 <= len(choice) / len(gold_choice) <= 1.25):
                distractors.append(choice)
                if len(distractors) == num_choices - 1:
                    break
        if len(distractors) < num_choices - 1:
            continue
        context_start = texts[t].rfind("\n", 0, max(0, cut - context_chars)) + 1
        gold = int(rng.integers(num_choices))
        choices = distractors[:gold] + [gold_choice] + distractors[gold:]
        examples.append(MultipleChoice(texts[t][context_start:cut], tuple(choices), gold))
    return examples


# ---------------------------------------------------------------------------------------------------------
# Routing statistics: how unevenly a model's experts are loaded on a corpus, in prefill and in decode.


def prefill_loads(model: CausalLM, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> dict:
    """Per MoE layer, the (token, expert) pairs routed to each expert over `sequences` (run in padded
    batches; padding excluded), and max/mean of those loads: over the whole corpus, and the mean over
    batches of each batch's max/mean (what one prefill step of `batch_size` sequences sees)."""
    from moejax import stats

    batches, masks = [], []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start:start + batch_size]]
        chunk += [[0]] * (batch_size - len(chunk))
        tokens, mask = pad_prompts(chunk, bucket=bucket_length(max(len(s) for s in chunk)))
        mask[len(sequences[start:start + batch_size]):] = False
        batches.append(tokens)
        masks.append(mask)
    trace = stats.load_trace(model, batches, masks)  # [batches, MoE layers, E]
    total = trace.sum(axis=0)
    per_batch = np.asarray(stats.max_over_mean(jnp.asarray(trace, jnp.float32)))  # [batches, layers]
    layers = [i for i, moe in enumerate(model.config.moe_layers) if moe]
    return {"layers": layers, "expert_loads": total.tolist(),
            "max_over_mean": [float(stats.max_over_mean(jnp.asarray(t, jnp.float32))) for t in total],
            "batch_max_over_mean": per_batch.mean(axis=0).tolist(), "batch_size": batch_size,
            "tokens": int(sum(int(m.sum()) for m in masks))}


def decode_loads(model: CausalLM, prompts: Sequence[Sequence[int]], steps: int, stop_tokens=None) -> dict:
    """Greedy decoding of all `prompts` together (moejax.generate's loop) for up to `steps` decode steps,
    recording each step's routing: per MoE layer, the mean fraction of experts that no token of the batch
    routes to (idle) in a decode step, and the mean max/mean load of a decode step. Rows that drew a stop
    token route nothing; steps after every row stopped are not run and not counted. An encoder-decoder
    model (moejax.seq2seq) takes sources as prompts and reports its decoder's MoE layers."""
    from moejax import stats
    from moejax.generate import decode

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    blocks = model.moe_blocks()
    if getattr(model, "is_encoder_decoder", False):  # prompts are sources; decode steps run the decoder only
        measured = [j for j, b in enumerate(blocks) if b.layer >= model.config.encoder_layers]
    else:
        measured = list(range(len(blocks)))  # decode checks the positions of the real tokens, as generate
    out = decode(model, [list(p) for p in prompts], steps + 1, record_loads=True, stop_tokens=stop_tokens)
    counts = np.asarray(out.loads)[1:int(out.steps) + 1][:, measured]  # decode steps run: [steps, layers, E]
    return {"layers": [blocks[j].layer for j in measured], "steps": int(out.steps),
            "batch_size": len(prompts), "idle_fraction": (counts == 0).mean(axis=(0, 2)).tolist(),
            "step_max_over_mean": np.asarray(stats.max_over_mean(jnp.asarray(counts, jnp.float32))).mean(0).tolist()}
