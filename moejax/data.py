"""Text corpora for training and evaluating small language models: read, split by document, tokenise, batch.

The default corpus is the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`), which
exists on every machine without a download. Its content differs slightly between Python versions, so
numbers measured on it are for the interpreter that produced them. Users can point the same code at a
directory of text files, one text file, or a JSONL file with a "text" field per line.

Splits are by document (never by random token) and fixed: a document's split is decided by a hash of its
name, so adding or removing files elsewhere never moves a document between train, validation and test.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import sysconfig
import textwrap
from typing import Iterable, Sequence

import numpy as np

from moejax.config import is_integer
from moejax.models.transformer import check_token_ids

STDLIB = "stdlib"
SPLITS = ("train", "validation", "test")
END_OF_DOCUMENT = "<|endoftext|>"  # separates documents in the token stream; the tokenizer's only special token

# Stdlib folders that are not stable library text: third-party installs, test suites, build-specific data.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root (or "file.jsonl:LINE"): stable across machines
    text: str


def load_documents(source: str, suffixes: Sequence[str] | None = None) -> list[Document]:
    """Documents sorted by name from "stdlib", a directory (files with `suffixes`, recursively), one text
    file, or a .jsonl file (one JSON object with a "text" field per line)."""
    if source == STDLIB:
        return _stdlib_documents()
    if not source:
        raise ValueError("corpus path is empty; give a directory, a text file, a .jsonl file or 'stdlib'")
    if not os.path.exists(source):
        raise FileNotFoundError(f"corpus path {source!r} does not exist")
    if os.path.isdir(source):
        documents = _directory_documents(source, tuple(suffixes or _TEXT_SUFFIXES))
    elif source.endswith(".jsonl"):
        documents = _jsonl_documents(source)
    else:
        with open(source, encoding="utf-8", errors="replace") as f:
            documents = [Document(os.path.basename(source), f.read())]
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise ValueError(f"corpus path {source!r} holds no non-empty text documents")
    return documents


def _stdlib_documents() -> list[Document]:
    root = sysconfig.get_paths()["stdlib"]
    documents = [d for d in _directory_documents(root, (".py",)) if not d.name.startswith("_sysconfigdata")]
    if not documents:
        raise ValueError(f"no Python source files found under the standard library directory {root!r}")
    return documents


def _directory_documents(root: str, suffixes: tuple[str, ...]) -> list[Document]:
    documents = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(suffixes):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    documents.append(Document(os.path.relpath(path, root).replace(os.sep, "/"), f.read()))
    return sorted(documents, key=lambda d: d.name)


def read_jsonl(path: str):
    """(line number, record) for each non-blank line; a malformed line (or one not UTF-8) fails naming the
    file and line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None


def _jsonl_documents(path: str) -> list[Document]:
    """A record's document is named by its "id" where it has one, else by a digest of its text, never by its
    line: records added or removed move no other document between splits, and copies of a text share one."""
    documents = []
    for line_number, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{line_number}: expected an object with a string field 'text'")
        identity = record.get("id")
        if identity is None:
            identity = hashlib.sha256(record["text"].encode()).hexdigest()[:16]
        elif not isinstance(identity, (str, int)) or isinstance(identity, bool):
            raise ValueError(f"{path}:{line_number}: 'id'={identity!r} must be a string or an integer")
        documents.append(Document(f"{os.path.basename(path)}:{identity}", record["text"]))
    return documents


def split_of(name: str, validation_fraction: float, test_fraction: float) -> str:
    """The fixed split of a document, from a hash of its name."""
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_documents(documents: Iterable[Document], validation_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> dict[str, list[Document]]:
    """{"train", "validation", "test"} -> documents, split by document name (see split_of)."""
    return _split(documents, lambda d: d.name, validation_fraction, test_fraction)


def _split(items, document_name, validation_fraction: float, test_fraction: float) -> dict[str, list]:
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must be "
                         "non-negative and sum to less than 1")
    splits = {s: [] for s in SPLITS}
    for item in items:
        splits[split_of(document_name(item), validation_fraction, test_fraction)].append(item)
    return splits


# ---------------------------------------------------------------------------------------------------------
# A sequence-to-sequence task from the same text: code -> its docstring's summary (code summarisation, the
# encoder-decoder workload moejax trains its default MT model on). Pairs keep their document's name, so the
# same split_of puts a whole file's functions in one split: held-out pairs come from held-out files.


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str  # "document:line" of the function
    source: str  # the function's code, its docstring removed
    target: str  # the docstring's first paragraph, whitespace collapsed


def function_pairs(documents: Iterable[Document], min_target_chars: int = 10) -> list[Pair]:
    """(code, summary) for every function or method with a docstring and a body besides it, in document
    order. A document that does not parse as Python contributes nothing (the stdlib has a few such files)."""
    pairs = []
    for d in documents:
        try:
            tree = ast.parse(d.text)
        except (SyntaxError, ValueError):
            continue
        lines = d.text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node)
            summary = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""
            if len(summary) < min_target_chars:
                continue
            # the signature (decorators excluded) and the body after the docstring, each dedented on its own
            head = "".join(lines[node.lineno - 1:node.body[0].lineno - 1])
            body = "".join(lines[node.body[1].lineno - 1:node.end_lineno])
            code = textwrap.dedent(head) + textwrap.indent(textwrap.dedent(body), "    ")
            pairs.append(Pair(f"{d.name}:{node.lineno}", code.rstrip() + "\n", summary))
    return pairs


def split_pairs(pairs: Iterable[Pair], validation_fraction: float = 0.05,
                test_fraction: float = 0.05) -> dict[str, list[Pair]]:
    """{"train", "validation", "test"} -> pairs, by their document (split_of of the name before ':'), so
    a pair lands where split_documents puts its document."""
    return _split(pairs, lambda p: p.name.rsplit(":", 1)[0], validation_fraction, test_fraction)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained locally with the `tokenizers` library (lossless: any text round-trips).


def train_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (END_OF_DOCUMENT,)):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts`; the special tokens take the first
    ids in order (by default id 0 is END_OF_DOCUMENT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    least = 256 + len(special_tokens)
    if vocab_size < least:
        raise ValueError(f"vocab_size={vocab_size} must be at least {least} (256 bytes + {len(special_tokens)} "
                         "special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_documents(tokenizer, documents: Sequence[Document]) -> list[np.ndarray]:
    """One int32 array of token ids per document."""
    return [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch([d.text for d in documents])]


def token_stream(encoded: Sequence[np.ndarray], separator: int) -> np.ndarray:
    """Documents joined into one int32 stream, each followed by `separator` (END_OF_DOCUMENT's id)."""
    if not is_integer(separator) or separator < 0:
        raise ValueError(f"separator={separator!r} must be a token id (an integer >= 0)")
    parts = []
    for ids in encoded:
        parts += [ids, np.asarray([separator], np.int32)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def document_stream(tokenizer, documents: Sequence[Document]) -> np.ndarray:
    """The documents tokenised and joined by token_stream, each followed by the tokenizer's END_OF_DOCUMENT
    id (0 when the tokenizer has no such token, as a checkpoint's own tokenizer may not)."""
    separator = tokenizer.token_to_id(END_OF_DOCUMENT)
    return token_stream(encode_documents(tokenizer, documents), 0 if separator is None else separator)


def training_batch(stream: np.ndarray, seed: int, step: int, batch_size: int, length: int) -> np.ndarray:
    """int32 [batch_size, length + 1] windows of `stream`, a pure function of (seed, step): a run resumed at
    any step sees exactly the batches an uninterrupted run would have."""
    for name, value, least in (("seed", seed, 0), ("step", step, 0), ("batch_size", batch_size, 1),
                               ("length", length, 1)):
        if not is_integer(value) or value < least:
            raise ValueError(f"training_batch: {name}={value!r} must be an integer >= {least}")
    if len(stream) < length + 2:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one training sequence "
                         f"({length + 1} tokens)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - length, size=batch_size)
    return np.stack([stream[s:s + length + 1] for s in starts])


def chunks(stream: np.ndarray, length: int, max_chunks: int | None = None) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of `length` tokens (the last may be shorter, >= 2 tokens)."""
    if not is_integer(length) or length < 2:  # 1 would leave no window of 2 tokens: an empty list, silently
        raise ValueError(f"chunks: length={length!r} must be an integer >= 2")
    if max_chunks is not None and (not is_integer(max_chunks) or max_chunks < 0):
        raise ValueError(f"chunks: max_chunks={max_chunks!r} must be an integer >= 0 or None")
    out = [stream[i:i + length] for i in range(0, len(stream), length)]
    out = [c for c in out if len(c) >= 2]
    return out[:max_chunks] if max_chunks is not None else out


def unigram_log_probs(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """float64 [vocab]: add-one smoothed unigram log-probabilities from a token stream (the baseline)."""
    if not is_integer(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer")
    stream = check_token_ids(stream, vocab_size, ndim=1, name="stream")  # bincount would grow past the vocabulary
    counts = np.bincount(stream, minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_perplexity(log_probs: np.ndarray, sequences: Sequence[Sequence[int]]) -> float:
    """Perplexity of the unigram model over every token after the first of each sequence (the tokens that
    evaluation.perplexity scores, so the two numbers compare)."""
    vocab = len(log_probs)
    rows = [check_token_ids(s, vocab, ndim=1, name=f"sequence {i}", row=i) for i, s in enumerate(sequences)]
    rows = [r[1:] for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("unigram_perplexity needs a sequence of at least 2 tokens")
    predicted = np.concatenate(rows)
    return float(np.exp(-log_probs[predicted].mean()))
