"""Tests for distil_jax.data: loading, tokenizing, pack/pad layouts, resumable batches."""

import json
import logging
import math
from types import SimpleNamespace

import datasets
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from distil_jax import data
from distil_jax.demo import corpus


@pytest.fixture(scope="module")
def texts():
    return corpus.stdlib_docstrings(max_docs=24)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return corpus.train_tokenizer(texts, vocab_size=300, model_max_length=128)


@pytest.fixture(scope="module")
def docs(texts, tokenizer):
    return data.tokenize(texts, tokenizer, batch_size=7)  # several batches, one ragged


def spec(uri, **kw):
    # Built in one go: ConfigDict would turn a later int test_size (a row count) into a float.
    fields = dict(uri=str(uri), subset=None, split="train", column="text", sample_size=None,
                  shuffle=False, seed=42, test_size=0.002)
    return ml_collections.ConfigDict({**fields, **kw})


def write_jsonl(path, rows, key="text"):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({key: r, "id": 0}) + "\n")


# ------------------------------------------------------------------------------- tokenizing


def test_tokenize_matches_the_tokenizer(texts, tokenizer, docs):
    assert len(docs) == len(texts)
    for text, ids in zip(texts[:3], docs[:3]):
        assert ids.dtype == np.int32
        assert ids.tolist() == tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert data.tokenize([""], tokenizer)[0].shape == (0,)


def test_tokenizer_without_eos_is_rejected(tokenizer):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="no eos token.*eos_token"):
        data.tokenize(["hello"], no_eos)


def test_tokenize_cached_reuses_the_cache(tmp_path, texts, tokenizer, docs, monkeypatch):
    first = data.tokenize_cached(texts, tokenizer, tmp_path)
    assert [d.tolist() for d in first] == [d.tolist() for d in docs]
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1

    def fail(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(data.tokens, "tokenize", fail)  # the name tokenize_cached calls
    second = data.tokenize_cached(texts, tokenizer, tmp_path)
    assert [d.tolist() for d in second] == [d.tolist() for d in docs]
    with pytest.raises(AssertionError, match="cache miss"):  # other texts: another key
        data.tokenize_cached(texts[:-1], tokenizer, tmp_path)


# ---------------------------------------------------------------------------------- layouts


def test_pack_small_example():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9]), np.array([10])]
    out = data.pack(docs, seq_len=4, eos_id=0)
    np.testing.assert_array_equal(
        out["input_ids"], [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0], [10, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        out["segment_ids"], [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1], [1, 1, 0, 0]]
    )
    assert out["input_ids"].dtype == np.int32 and out["segment_ids"].dtype == np.int32
    assert data.layout_stats(out) == {
        "rows": 4, "real_tokens": 14, "counted_tokens": 14, "padding_fraction": 2 / 16,
        "documents": 5
    }
    empty = data.pack([], seq_len=4, eos_id=0)
    assert empty["input_ids"].shape == (0, 4)
    assert data.layout_stats(empty)["padding_fraction"] == 0.0


def test_pack_loses_and_duplicates_nothing(docs, tokenizer, caplog):
    eos = tokenizer.eos_token_id
    seq_len = 64
    with caplog.at_level(logging.INFO, logger="distil_jax.data"):
        out = data.pack(docs, seq_len, eos)
    ids, seg = out["input_ids"], out["segment_ids"]
    total = sum(len(d) + 1 for d in docs)
    assert ids.shape == (math.ceil(total / seq_len), seq_len)
    # Real tokens, read segment by segment in row order, are exactly docs each followed by EOS.
    pieces = [ids[r][seg[r] == s] for r in range(len(ids)) for s in range(1, seg[r].max() + 1)]
    np.testing.assert_array_equal(
        np.concatenate(pieces), np.concatenate([np.append(d, eos) for d in docs])
    )
    # Every segment but a row's last ends with EOS (a document ends there); padding is trailing.
    for r in range(len(ids)):
        for s in range(1, seg[r].max()):
            assert ids[r][seg[r] == s][-1] == eos
        real = seg[r] > 0
        assert not np.any(real[1:] & ~real[:-1])  # no real token after padding
        assert np.all(np.diff(seg[r][real]) >= 0)  # ids ascend from 1 by steps of 0 or 1
        assert np.all(np.diff(seg[r][real]) <= 1) and (not real.any() or seg[r][0] == 1)
    stats = data.layout_stats(out)
    assert stats["real_tokens"] == total
    assert stats["padding_fraction"] == pytest.approx(1 - total / ids.size)
    n_long = sum(len(d) + 1 > seq_len for d in docs)
    assert n_long > 0 and f"{n_long} of {len(docs)} documents are longer" in caplog.text


def test_pad_layout_and_truncation(docs, tokenizer, caplog):
    pad_id = tokenizer.pad_token_id
    seq_len = 64
    with caplog.at_level(logging.INFO, logger="distil_jax.data"):
        out = data.pad(docs, seq_len, pad_id)
    ids, seg = out["input_ids"], out["segment_ids"]
    assert ids.shape == seg.shape == (len(docs), seq_len)
    for d, row, srow in zip(docs, ids, seg):
        n = min(len(d), seq_len)
        np.testing.assert_array_equal(row[:n], d[:n])
        assert np.all(row[n:] == pad_id)
        assert np.all(srow[:n] == 1) and np.all(srow[n:] == 0)
    n_trunc = sum(len(d) > seq_len for d in docs)
    assert f"{n_trunc} of {len(docs)} documents are longer than seq_len={seq_len}" in caplog.text
    real = sum(min(len(d), seq_len) for d in docs)
    stats = data.layout_stats(out)
    assert stats["real_tokens"] == real and stats["rows"] == len(docs)
    assert stats["documents"] == sum(len(d) > 0 for d in docs)
    assert stats["padding_fraction"] == pytest.approx(1 - real / ids.size)

    small = data.pad([np.array([5, 6, 7]), np.array([], np.int32)], seq_len=2, pad_id=9)
    np.testing.assert_array_equal(small["input_ids"], [[5, 6], [9, 9]])
    np.testing.assert_array_equal(small["segment_ids"], [[1, 1], [0, 0]])


def test_truncate_gives_distilys_tokens_in_both_layouts():
    """Documents of 1500, 300, 800 and 2100 tokens in rows of 1024: with truncate (Distily) both
    layouts hold the same 3,148 tokens, each document whole in one segment starting a row or
    packed after others; without it pack keeps all 4,700 (+ an EOS each) and pad continues the
    long ones in further rows."""
    rs = np.random.RandomState(0)
    docs = [rs.randint(1, 1000, n).astype(np.int32) for n in (1500, 300, 800, 2100)]
    kept = [d[:1024] for d in docs]
    for layout in ("pad", "pack"):
        out = data.docs_to_rows(docs, 1024, layout, eos_id=0, pad_id=0, truncate=True, append_eos=False)
        assert data.layout_stats(out)["real_tokens"] == 1024 + 300 + 800 + 1024 == 3148
        pieces = [out["input_ids"][r][out["segment_ids"][r] == k] for r in range(len(out["input_ids"]))
                  for k in range(1, out["segment_ids"][r].max() + 1)]
        assert sorted(p.tolist() for p in pieces) == sorted(d.tolist() for d in kept)
    pack = data.docs_to_rows(docs, 1024, "pack", eos_id=0, pad_id=0, truncate=False, append_eos=True)
    assert data.layout_stats(pack)["real_tokens"] == 4700 + 4
    pad = data.docs_to_rows(docs, 1024, "pad", eos_id=0, pad_id=0, truncate=False, append_eos=False)
    assert data.layout_stats(pad)["real_tokens"] == 4700 and len(pad["input_ids"]) == 2 + 1 + 1 + 3
    np.testing.assert_array_equal(pad["input_ids"][1][:476], docs[0][1024:])  # the continuation
    # append_eos in the pad layout: the EOS is the document's last token, inside the row.
    pad_eos = data.docs_to_rows(docs[1:2], 1024, "pad", eos_id=7, pad_id=0, truncate=True, append_eos=True)
    assert pad_eos["input_ids"][0][300] == 7 and pad_eos["segment_ids"][0][300] == 1


def test_pack_with_truncate_keeps_documents_whole_in_fewer_rows():
    """Best-fit packing: no document is split, every row holds at most seq_len tokens, and
    short documents share rows: 6 documents in 3 rows here (pad: 6 rows)."""
    lengths = [600, 400, 500, 500, 1024, 24]
    docs = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
    out = data.pack(docs, 1024, 0, truncate=True, append_eos=False)
    assert out["input_ids"].shape == (3, 1024)
    seen = []
    for ids, seg in zip(out["input_ids"], out["segment_ids"]):
        for k in range(1, seg.max() + 1):
            piece = ids[seg == k]
            assert len(set(piece.tolist())) == 1  # one document per segment
            seen.append((int(piece[0]) - 1, len(piece)))
        real = seg > 0
        assert not np.any(real[1:] & ~real[:-1])  # padding only at the end
    assert sorted(seen) == list(enumerate(lengths))  # each document once, whole
    assert data.layout_stats(out)["real_tokens"] == sum(lengths) == 3 * 1024 - 24
    assert data.best_fit_rows([3, 0, 2], 4) == [[0], [2]]  # empty documents take no row
    with pytest.raises(ValueError, match="more than a row"):
        data.best_fit_rows([5], 4)


def test_distily_eval_rows():
    docs = [np.array([5, 6, 7, 8, 9]), np.array([3]), np.array([], np.int32)]
    out = data.distily_eval_rows(docs, 4, bos_id=1, pad_id=0)
    np.testing.assert_array_equal(out["input_ids"], [[1, 5, 6, 7], [1, 3, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    no_bos = data.distily_eval_rows(docs[:1], 4, bos_id=None, pad_id=0)
    np.testing.assert_array_equal(no_bos["input_ids"], [[5, 6, 7, 0]])  # still seq_len - 1 tokens


def test_packing_removes_padding(docs, tokenizer):
    packed = data.layout_stats(data.pack(docs, 256, tokenizer.eos_token_id))
    padded = data.layout_stats(data.pad(docs, 256, tokenizer.pad_token_id))
    assert packed["padding_fraction"] * packed["rows"] * 256 < 256  # only the last row pads
    assert packed["padding_fraction"] < padded["padding_fraction"]
    # pad truncates long documents; pack keeps every token (+ one EOS per document).
    assert packed["real_tokens"] == sum(len(d) + 1 for d in docs) > padded["real_tokens"]


# ---------------------------------------------------------------------------------- loading


def test_load_jsonl_split_sizes_match_datasets(tmp_path):
    rows = [f"document {i}" for i in range(5000)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    train, test = data.load_texts(spec(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "hf"))
    assert (len(train), len(test)) == (4990, 10)
    assert sorted(train + test) == sorted(rows)
    # Exactly datasets' train_test_split(test_size, seed) rows, as Distily calls it.
    ref = datasets.Dataset.from_dict({"text": rows}).train_test_split(test_size=0.002, seed=42)
    assert test == list(ref["test"]["text"]) and train == list(ref["train"]["text"])

    first = data.load_texts(
        spec(tmp_path / "d.jsonl", sample_size=100, test_size=0.1), cache_dir=str(tmp_path / "hf")
    )
    assert (len(first[0]), len(first[1])) == (90, 10)
    assert sorted(first[0] + first[1]) == sorted(rows[:100])  # the first N rows, no shuffle

    shuffled = data.load_texts(
        spec(tmp_path / "d.jsonl", sample_size=100, shuffle=True, seed=1),
        cache_dir=str(tmp_path / "hf"),
    )
    ref = datasets.Dataset.from_dict({"text": rows}).shuffle(seed=1).select(range(100))
    assert sorted(shuffled[0] + shuffled[1]) == sorted(ref["text"])


def test_row_count_test_size_from_the_config_field(tmp_path):
    """dataset.test_size holds a float (default 0.002), so ConfigDict turns
    --config.dataset.test_size=2 into 2.0: a whole number >= 1 is a row count, as the message
    for a bad value offers; the rows are datasets' train_test_split(test_size=2)'s."""
    from distil_jax import config as config_lib

    c = config_lib.default_config()
    c.dataset.test_size = 2
    assert c.dataset.test_size == 2.0 and isinstance(c.dataset.test_size, float)
    config_lib._check_ranges(c)  # accepted
    for bad in (0, 1.5, -3):
        c.dataset.test_size = bad
        with pytest.raises(ValueError, match="dataset.test_size=.*integer row count"):
            config_lib._check_ranges(c)

    rows = [f"document {i}" for i in range(30)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    s = ml_collections.ConfigDict(dict(spec(tmp_path / "d.jsonl")))
    s.test_size = 2
    train, test = data.load_texts(s, cache_dir=str(tmp_path / "hf"))
    ref = datasets.Dataset.from_dict({"text": rows}).train_test_split(test_size=2, seed=42)
    assert test == list(ref["test"]["text"]) and train == list(ref["train"]["text"])


def test_row_length_says_when_it_cuts(caplog):
    """dataset.max_seq_len above what the model or the tokenizer takes is cut, with a warning
    that names both numbers; within them, silently kept."""
    with caplog.at_level(logging.INFO, logger="distil_jax.data"):
        assert data.row_length(1024, 1024, 1024) == 1024
        assert data.row_length(512, 1024, None) == 512
        assert caplog.text == ""
        assert data.row_length(2048, 1024, int(1e30)) == 1024
    assert ("dataset.max_seq_len=2048 is more than the teacher's maximum positions (1024): rows are "
            "1024 tokens long") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distil_jax.data"):
        assert data.row_length(2048, 1024, 512) == 512
    assert "more than the tokenizer's model_max_length (512)" in caplog.text


def test_load_txt_and_parquet(tmp_path):
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "a.txt").write_text("first doc\nline two\n\nsecond paragraph\n")
    (txt / "b.txt").write_text("another doc\n")
    (txt / ".hidden.txt").write_text("never read\n")
    hf = str(tmp_path / "hf")
    train, test = data.load_texts(spec(txt, test_size=0.5), cache_dir=hf)
    assert sorted(train + test) == ["another doc\n", "first doc\nline two\n\nsecond paragraph\n"]
    lines = data.load_texts(
        SimpleNamespace(uri=str(txt / "a.txt"), sample_by="line", test_size=1), cache_dir=hf
    )
    assert sorted(lines[0] + lines[1]) == ["first doc", "line two", "second paragraph"]

    table = pa.table({"content": [f"parquet row {i}" for i in range(20)], "n": list(range(20))})
    pq.write_table(table, tmp_path / "p.parquet")
    train, test = data.load_texts(
        spec(tmp_path / "p.parquet", column="content", test_size=0.25), cache_dir=hf
    )
    assert (len(train), len(test)) == (15, 5)
    assert sorted(train + test) == sorted(table["content"].to_pylist())


def test_load_errors(tmp_path):
    hf = str(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_texts(spec(tmp_path / "missing.jsonl"), cache_dir=hf)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no rows"):
        data.load_texts(spec(tmp_path / "empty.jsonl"), cache_dir=hf)
    write_jsonl(tmp_path / "one.jsonl", ["only row"])
    with pytest.raises(ValueError, match="empty train split"):
        data.load_texts(spec(tmp_path / "one.jsonl"), cache_dir=hf)
    with pytest.raises(ValueError, match=r"no column 'body'; available columns: \['text', 'id'\]"):
        data.load_texts(spec(tmp_path / "one.jsonl", column="body"), cache_dir=hf)
    with pytest.raises(ValueError, match="holds int values, not text"):
        data.load_texts(spec(tmp_path / "one.jsonl", column="id"), cache_dir=hf)
    # conftest sets HF_HUB_OFFLINE=1: a hub id fails fast with a pointer to local paths.
    with pytest.raises(ConnectionError, match="could not reach dataset 'someone/corpus'.*local"):
        data.load_texts(spec("someone/corpus", sample_size=10), cache_dir=hf)


def test_build_datasets(tmp_path, texts, tokenizer, docs):
    write_jsonl(tmp_path / "c.jsonl", texts)
    s = spec(tmp_path / "c.jsonl", test_size=4, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="use 'pack' or 'pad'"):
        data.build_datasets(s, tokenizer, 64, "concat")
    by_text = dict(zip(texts, docs))
    train_texts, test_texts = data.load_texts(s)
    eos = tokenizer.eos_token_id
    # The spec's truncate / append_eos (absent: Distily's True / False) reach both layouts.
    for layout, truncate, append_eos in (("pack", True, False), ("pad", True, False),
                                         ("pack", False, True), ("pad", False, False)):
        s_layout = spec(tmp_path / "c.jsonl", test_size=4, cache_dir=str(tmp_path / "hf"),
                        **({} if truncate else dict(truncate=False, append_eos=append_eos)))
        train, test, stats = data.build_datasets(s_layout, tokenizer, 64, layout, tmp_path / "tok")
        assert (stats["truncate"], stats["append_eos"]) == (truncate, append_eos)
        assert stats["train"]["documents"] == 20 and stats["test"]["documents"] == 4
        splits = ((train, train_texts, "train"), (test.rows, test_texts, "test"))
        for arrays, split_texts, name in splits:
            split_docs = [by_text[t] for t in split_texts]
            if layout == "pack":
                ref = data.pack(split_docs, 64, eos, truncate=truncate, append_eos=append_eos)
            else:
                ref = data.pad(split_docs, 64, tokenizer.pad_token_id, truncate=truncate)
            np.testing.assert_array_equal(arrays["input_ids"], ref["input_ids"])
            np.testing.assert_array_equal(arrays["segment_ids"], ref["segment_ids"])
            assert stats[name]["real_tokens"] == int((arrays["segment_ids"] > 0).sum())
            assert stats[name]["tokens"] == sum(len(d) for d in split_docs)
            extra = 1 if append_eos else 0
            assert stats[name]["real_tokens"] == sum(min(len(d) + extra, 64) if truncate else len(d) + extra
                                                     for d in split_docs)
        # Distily's evaluator rows of the held-out documents: BOS, then the first 63 tokens.
        test_docs = [by_text[t] for t in test_texts]
        assert test.distily_rows["input_ids"].shape == (4, 64)
        for row, seg, d in zip(test.distily_rows["input_ids"], test.distily_rows["segment_ids"], test_docs):
            n = min(len(d), 63)
            assert row[0] == tokenizer.bos_token_id and row[1:1 + n].tolist() == d[:n].tolist()
            assert seg.tolist() == [1] * (n + 1) + [0] * (63 - n)
    assert stats["train"]["truncated_documents"] == sum(len(by_text[t]) > 64 for t in train_texts)


# --------------------------------------------------------------------------------- batching


def row_arrays(n, seq_len=3):
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return {"input_ids": ids, "segment_ids": np.ones_like(ids)}


def test_batch_iterator_epochs_and_determinism():
    it = data.BatchIterator(row_arrays(10), 3, seed=7)
    assert it.steps_per_epoch == 3
    epochs = [[next(it)["input_ids"][:, 0] for _ in range(3)] for _ in range(3)]
    for e, batches in enumerate(epochs):
        rows = np.concatenate(batches)
        assert len(set(rows.tolist())) == 9  # a permutation, incomplete tail dropped
        np.testing.assert_array_equal(rows, np.random.default_rng([7, e]).permutation(10)[:9])
    assert it.state() == {"epoch": 3, "index": 0}
    again = data.BatchIterator(row_arrays(10), 3, seed=7)
    np.testing.assert_array_equal(next(again)["input_ids"][:, 0], epochs[0][0])

    ordered = data.BatchIterator(row_arrays(5), 2, shuffle=False, drop_last=False)
    assert ordered.steps_per_epoch == 3
    got = [next(ordered) for _ in range(4)]
    assert [b["input_ids"][:, 0].tolist() for b in got] == [[0, 1], [2, 3], [4, 0], [0, 1]]
    assert got[2]["segment_ids"][1].tolist() == [0, 0, 0]  # fill row is fully masked
    with pytest.raises(ValueError, match="no batch of batch_size=8"):
        data.BatchIterator(row_arrays(5), 8)


def test_batch_iterator_restores_mid_epoch_and_across_epochs():
    arrays = row_arrays(11)
    reference = data.BatchIterator(arrays, 4, seed=3)  # 2 steps per epoch
    expected = [next(reference) for _ in range(9)]
    for k in range(5):
        original = data.BatchIterator(arrays, 4, seed=3)
        for _ in range(k):
            next(original)
        state = json.loads(json.dumps(original.state()))
        restored = data.BatchIterator(arrays, 4, seed=3)
        restored.restore(state)
        for j in range(4):  # crosses at least one epoch boundary
            got = next(restored)
            for key in arrays:
                np.testing.assert_array_equal(got[key], expected[k + j][key])
    with pytest.raises(ValueError, match="cannot restore"):
        reference.restore({"epoch": 0, "index": 5})


def test_eval_batches_cover_every_row_once():
    arrays = row_arrays(10)
    arrays["segment_ids"][::2, 1:] = 0
    batches = list(data.eval_batches(arrays, 4))
    assert len(batches) == 3
    assert all(b[k].shape == (4, 3) for b in batches for k in b)
    for key in arrays:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches])[:10], arrays[key])
    assert np.all(batches[-1]["segment_ids"][2:] == 0)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert real == int((arrays["segment_ids"] > 0).sum())
    assert list(data.eval_batches(row_arrays(0), 4)) == []


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"bad.jsonl: line 2 is not valid JSON"),
    ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', r"list.jsonl: line 2 is a JSON list, not an object"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl: invalid UTF-8 at line 2"),
    ("latin1.txt", b"hello\ncaf\xe9\n", r"latin1.txt: invalid UTF-8 at line 2"),
])
def test_unreadable_dataset_file_is_a_one_line_error_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        data.load_texts(SimpleNamespace(uri=str(tmp_path / name), test_size=0.5))
    assert len(str(e.value).splitlines()) == 1


def test_split_of_empty_texts_is_an_error(tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [""] * 9 + ["some text"])
    with pytest.raises(ValueError, match=r"every text of the (train|held-out test) split .* is empty"):
        data.load_texts(SimpleNamespace(uri=str(tmp_path / "e.jsonl"), test_size=0.5, seed=1))
