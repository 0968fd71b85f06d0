"""Corpus reading, document splits, the byte-level BPE tokenizer, deterministic batches, the unigram baseline."""

import json
import math
import textwrap

import numpy as np
import pytest

from moejax import data

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "import os\nprint(os.sep)\n"] * 3


def test_tokenizer_round_trips_any_text():
    tokenizer = data.train_tokenizer(TEXTS, vocab_size=300)
    assert 257 < tokenizer.get_vocab_size() <= 300  # fewer when the text runs out of merges
    assert tokenizer.token_to_id(data.END_OF_DOCUMENT) == 0
    for text in ["def add(a, b):\n    return a + b\n", "ünïcödé → 字 \t\r\n  ", "never seen: zqxj 12345 {}[]"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    merged = tokenizer.encode("    return a + b").ids
    assert len(merged) < len("    return a + b")  # BPE merges learned from the training text


def test_tokenizer_needs_the_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size=100"):
        data.train_tokenizer(TEXTS, vocab_size=100)


def test_directory_corpus_is_sorted_and_filtered(tmp_path):
    (tmp_path / "b.py").write_text("b = 2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.md").write_text("  \n")
    documents = data.load_documents(str(tmp_path))
    assert [d.name for d in documents] == ["b.py", "sub/a.txt"]
    assert documents[1].text == "alpha\n"


def test_jsonl_corpus(tmp_path):
    import hashlib

    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 7}) + "\n")
    digest = hashlib.sha256(b"first").hexdigest()[:16]
    assert [(d.name, d.text) for d in data.load_documents(str(path))] == [(f"corpus.jsonl:{digest}", "first"),
                                                                         ("corpus.jsonl:7", "second")]


def test_jsonl_splits_do_not_move_when_records_are_added(tmp_path):
    """A document's split follows its id or text, not its line: a record prepended moves no other document,
    and copies of one text share a split (none leaks into a held-out split)."""
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)]
    splits = {}
    for version, items in (("v1", texts), ("v2", ["def new():\n    pass\n"] + texts + [texts[0]] * 5)):
        (tmp_path / version).mkdir()
        path = tmp_path / version / "corpus.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
        splits[version] = [(d.text, name) for name, docs in data.split_documents(data.load_documents(str(path)),
                                                                                0.1, 0.1).items() for d in docs]
    before, after = dict(splits["v1"]), dict(splits["v2"])
    assert all(after[t] == before[t] for t in texts) and len(set(before.values())) == 3
    assert len({name for text, name in splits["v2"] if text == texts[0]}) == 1  # six copies, one split


def test_a_jsonl_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text"):
        data.load_documents(str(path))


def test_bad_corpus_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_documents(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="empty"):
        data.load_documents("")
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.load_documents(str(tmp_path))  # an empty directory
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_documents(str(bad))
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        data.load_documents(str(bad))


def test_stdlib_corpus_is_python_source_without_tests():
    documents = data.load_documents(data.STDLIB)
    names = [d.name for d in documents]
    assert names == sorted(names) and len(names) > 100
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) or "/test/" in n for n in names)


def test_split_is_by_document_and_fixed():
    documents = [data.Document(f"module_{i}.py", f"x = {i}\n") for i in range(400)]
    splits = data.split_documents(documents, validation_fraction=0.1, test_fraction=0.2)
    assert sorted(d.name for s in splits.values() for d in s) == sorted(d.name for d in documents)
    assert 20 < len(splits["validation"]) < 60 and 50 < len(splits["test"]) < 110
    # a document's split depends on its name only, not on which other documents exist
    fewer = data.split_documents(documents[::3], validation_fraction=0.1, test_fraction=0.2)
    for name, split in fewer.items():
        assert {d.name for d in split} <= {d.name for d in splits[name]}
    with pytest.raises(ValueError, match="test_fraction=0.9"):
        data.split_documents(documents, validation_fraction=0.2, test_fraction=0.9)


def test_training_batch_depends_only_on_seed_and_step():
    stream = np.arange(1000, dtype=np.int32)
    a = data.training_batch(stream, seed=1, step=5, batch_size=4, length=16)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, data.training_batch(stream, seed=1, step=5, batch_size=4, length=16))
    assert not np.array_equal(a, data.training_batch(stream, seed=1, step=6, batch_size=4, length=16))
    assert not np.array_equal(a, data.training_batch(stream, seed=2, step=5, batch_size=4, length=16))
    np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous windows of the stream
    with pytest.raises(ValueError, match="shorter than one training sequence"):
        data.training_batch(stream[:10], seed=0, step=0, batch_size=1, length=16)


def test_token_stream_and_chunks():
    stream = data.token_stream([np.array([5, 6]), np.array([7])], separator=0)
    np.testing.assert_array_equal(stream, [5, 6, 0, 7, 0])
    assert [c.tolist() for c in data.chunks(np.arange(7), 3)] == [[0, 1, 2], [3, 4, 5]]  # a 1-token tail predicts nothing


def test_unigram_perplexity_against_brute_force():
    stream = np.array([1, 1, 2, 3, 1, 2], np.int32)
    log_probs = data.unigram_log_probs(stream, vocab_size=5)
    counts = np.array([0, 3, 2, 1, 0]) + 1.0
    np.testing.assert_allclose(np.exp(log_probs), counts / counts.sum())
    sequences = [[1, 2, 4], [3, 1]]
    expected = math.exp(-(math.log(3 / 11) + math.log(1 / 11) + math.log(4 / 11)) / 3)
    assert math.isclose(data.unigram_perplexity(log_probs, sequences), expected, rel_tol=1e-12)


def test_function_pairs_take_code_without_docstring_and_the_summary():
    source = textwrap.dedent('''
        import os

        class Path:
            @property
            def absolute(self, strict=False):
                """Return the path made
                absolute.

                Details that are not the summary.
                """
                return os.path.abspath(self.name)

        def short():
            """Too short."""
            return 1

        def only_docstring():
            """Has no body besides its docstring."""
        ''')
    pairs = data.function_pairs([data.Document("pkg/path.py", source),
                                 data.Document("broken.py", "def f(:\n")], min_target_chars=12)
    assert pairs == [data.Pair("pkg/path.py:6", "def absolute(self, strict=False):\n"
                               "    return os.path.abspath(self.name)\n", "Return the path made absolute.")]


def test_pairs_split_with_their_document():
    documents = data.load_documents("stdlib")
    pairs = data.function_pairs(documents)
    assert len(pairs) > 1000
    by_document = {d.name: s for s, ds in data.split_documents(documents).items() for d in ds}
    for split, members in data.split_pairs(pairs).items():
        assert members, split
        assert all(by_document[p.name.rsplit(":", 1)[0]] == split for p in members)
