"""The translation workload of an encoder-decoder model: (source, target) text pairs -> padded token arrays,
held-out quality by chrF and BLEU (sacrebleu) next to a copy-the-source baseline, and target perplexity.

Token conventions are NLLB's: a source is its tokens then </s>; a decoder input starts from the decoder
start token (</s> for NLLB) and the target ends with </s>; padding is <pad>. Tokenizers this module trains
put <s>, <pad>, </s>, <unk> at ids 0-3, NLLB-MoE's own ids.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import data
from moejax.config import is_integer

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3: NLLB's bos, pad, eos (= decoder start), unk


def train_tokenizer(pairs: Sequence[data.Pair], vocab_size: int):
    """A byte-level BPE tokenizer over both sides of the pairs (one vocabulary, as NLLB shares its own)."""
    texts = (text for p in pairs for text in (p.source, p.target))
    return data.train_tokenizer(texts, vocab_size, special_tokens=SPECIAL_TOKENS)


class EncodedPairs(NamedTuple):
    source: np.ndarray  # int32 [N, S]: tokens then eos, right-padded with pad
    source_mask: np.ndarray  # bool [N, S]
    target: np.ndarray  # int32 [N, T + 1]: decoder start, tokens, eos, right-padded
    target_mask: np.ndarray  # bool [N, T + 1]

    def rows(self, index) -> tuple:
        return tuple(a[index] for a in self)


def _special_ids(config) -> tuple[int, int, int]:
    from moejax.seq2seq.generate import start_token

    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    if eos is None or config.pad_token_id is None:
        raise ValueError(f"{config.architecture}: translation needs an eos_token_id and a pad_token_id in the config")
    return start_token(config), int(eos), int(config.pad_token_id)


def encode_pairs(tokenizer, pairs: Sequence[data.Pair], config, max_source_tokens: int,
                 max_target_tokens: int) -> EncodedPairs:
    """The pairs tokenised (sources cut to max_source_tokens with their eos, targets to max_target_tokens
    with theirs) for a model of `config` (its start, eos and pad ids)."""
    for name, value in (("max_source_tokens", max_source_tokens), ("max_target_tokens", max_target_tokens)):
        if not is_integer(value) or value < 2:
            raise ValueError(f"{name}={value!r} must be an integer >= 2 (a token and the eos)")
    if not pairs:
        raise ValueError("encode_pairs: no pairs to encode")
    start, eos, pad = _special_ids(config)
    sources = [e.ids[:max_source_tokens - 1] + [eos] for e in tokenizer.encode_batch([p.source for p in pairs])]
    targets = [[start] + e.ids[:max_target_tokens - 1] + [eos]
               for e in tokenizer.encode_batch([p.target for p in pairs])]
    source, source_mask = _right_padded(sources, pad)
    target, target_mask = _right_padded(targets, pad)
    return EncodedPairs(source, source_mask, target, target_mask)


def _right_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


def training_batch(encoded: EncodedPairs, seed: int, step: int, batch_size: int) -> tuple:
    """batch_size pairs drawn with replacement, a pure function of (seed, step) (so a resumed run sees the
    batches an uninterrupted one would), at the encoded arrays' full width (one shape: one compile)."""
    rng = np.random.default_rng([seed, step])
    return encoded.rows(rng.integers(0, len(encoded.source), size=batch_size))


def trimmed(batch: tuple) -> tuple:
    """A batch (source, source_mask, target, target_mask) without the columns that are padding in every row."""
    source, source_mask, target, target_mask = batch
    s, t = max(int(source_mask.sum(1).max()), 1), max(int(target_mask.sum(1).max()), 2)
    return source[:, :s], source_mask[:, :s], target[:, :t], target_mask[:, :t]


@functools.partial(jax.jit, static_argnums=0)
def _target_log_likelihood(graphdef, state, source, source_mask, target, target_mask):
    model = nnx.merge(graphdef, state)
    logits = model.forward(source, target[:, :-1], source_mask=source_mask, decoder_mask=target_mask[:, :-1]).logits
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[:, 1:, None], axis=-1)[..., 0]
    counted = target_mask[:, 1:]
    return jnp.where(counted, picked, 0.0).sum(), counted.sum()


def target_perplexity(model, encoded: EncodedPairs, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood) of every target token after the decoder start (eos included),
    teacher-forced on its source."""
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for i in range(0, len(encoded.source), batch_size):
        ll, n = _target_log_likelihood(graphdef, state, *trimmed(encoded.rows(slice(i, i + batch_size))))
        total, count = total + float(ll), count + int(n)
    return float(np.exp(-total / count))


def translate(model, tokenizer, encoded: EncodedPairs, max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy translations of the encoded sources, cut at the first eos and detokenised."""
    import moejax

    _, eos, _ = _special_ids(model.config)
    out = []
    for i in range(0, len(encoded.source), batch_size):
        source, source_mask, _, _ = trimmed(encoded.rows(slice(i, i + batch_size)))
        sources = [row[mask].tolist() for row, mask in zip(source, source_mask)]
        tokens = np.asarray(moejax.generate(model, sources, max_new_tokens=max_new_tokens, stop_tokens=[eos]))
        for row in tokens:
            ids = row.tolist()
            out.append(tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids).strip())
    return out


def quality(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus chrF and BLEU (sacrebleu's defaults) of hypotheses against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"quality: {len(hypotheses)} hypotheses for {len(references)} references")
    return {"chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score,
            "bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score}


def copy_baseline(pairs: Sequence[data.Pair]) -> dict:
    """The quality of answering each source with itself: what a model must beat to have learnt anything."""
    return quality([p.source for p in pairs], [p.target for p in pairs])
