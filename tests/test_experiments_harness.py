"""experiments/harness.py and moejax.results.Results, which every experiment script uses: results resume,
refuse or start over by their settings; timing is round robin; the held-out stream is the split's documents
joined as moejax.data joins them."""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from moejax import data
from moejax.results import Results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import harness  # noqa: E402


def test_results_resume_refuse_or_start_over_by_their_settings(tmp_path):
    settings = {"sizes": (1, 2), "checkpoint": "a"}
    results = Results(str(tmp_path), settings)
    assert not results.resumed and results.todo([{"k": 1}, {"k": 2}]) == [{"k": 1}, {"k": 2}]
    results.add({"k": 1, "value": 0.5})
    assert json.load(open(tmp_path / "results.json")) == {"settings": {"sizes": [1, 2], "checkpoint": "a"},
                                                         "cells": [{"k": 1, "value": 0.5}]}
    again = Results(str(tmp_path), settings)  # tuples read back as lists: still the same settings
    assert again.resumed and again.todo([{"k": 1}, {"k": 2}]) == [{"k": 2}]
    assert again.find({"k": 1}) == {"k": 1, "value": 0.5}
    with pytest.raises(ValueError, match=r"other settings \(differing: \['checkpoint'\]\)"):
        Results(str(tmp_path), dict(settings, checkpoint="b"))
    fresh = Results(str(tmp_path), dict(settings, checkpoint="b"), on_mismatch="restart")
    assert not fresh.resumed and fresh.cells == [] and fresh.data["settings"]["checkpoint"] == "b"


def test_round_robin_interleaves_the_calls_and_timing_drops_the_warmup():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in ("a", "b", "c")}
    assert harness.round_robin(calls, 2) == {"a": ["a", "a"], "b": ["b", "b"], "c": ["c", "c"]}
    assert order == ["a", "b", "c", "a", "b", "c"]
    seconds = harness.interleaved_seconds({"x": lambda: np.zeros(3)}, repeats=3, warmup=2)
    assert len(seconds["x"]) == 3 and all(s >= 0 for s in seconds["x"])


def test_full_windows():
    stream = np.arange(10)
    assert [w.tolist() for w in harness.full_windows(stream, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert harness.full_windows(stream, 11) == []


def test_held_out_stream_is_the_split_joined_by_end_of_document(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * (i + 1))
    corpus = ml_collections.ConfigDict(dict(source=str(tmp_path), validation_fraction=0.4, test_fraction=0.2))
    splits = harness.corpus_splits(corpus)
    assert splits == data.split_documents(data.load_documents(str(tmp_path)), 0.4, 0.2) and splits["validation"]
    tokenizer = data.train_tokenizer([d.text for d in splits["train"]], 300)
    stream, info = harness.held_out_stream(tokenizer, corpus, "validation")
    separator = tokenizer.token_to_id(data.END_OF_DOCUMENT)
    want = data.token_stream(data.encode_documents(tokenizer, splits["validation"]), separator)
    np.testing.assert_array_equal(stream, want)
    assert info == {"corpus": str(tmp_path), "split": "validation", "documents": len(splits["validation"]),
                    "split_tokens": len(want)}


def test_the_machine_header_names_the_versions():
    header = harness.header()
    assert header["command"].startswith("python ")
    m = header["machine"]
    assert {"platform", "cpu", "cpus", "backend", "device", "devices", "python", "jax", "flax", "numpy"} <= set(m)
    assert f"jax {m['jax']}, flax {m['flax']}, numpy {m['numpy']}" in harness.describe(m)


def test_a_checkpoint_rewritten_in_place_has_another_identity(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    (tmp_path / "notes.txt").write_text("not part of it")
    before = harness.checkpoint_identity(str(tmp_path))
    assert sorted(before) == ["config.json", "model.safetensors"]
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert harness.checkpoint_identity(str(tmp_path)) != before
