"""Tests for distil_jax.demo.corpus: the stdlib docstring corpus and the byte-level BPE tokenizer."""

import json

import pytest
import transformers

from distil_jax.demo import corpus


@pytest.fixture(scope="module")
def docs():
    return corpus.stdlib_docstrings(max_docs=30)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return corpus.train_tokenizer(docs, vocab_size=300, model_max_length=128)


def test_corpus_is_deterministic_and_long_enough(docs):
    assert len(docs) == 30
    corpus._module_document.cache_clear()  # parsed again, not this process's cached parses
    assert corpus.stdlib_docstrings(max_docs=30) == docs
    assert all(isinstance(d, str) and len(d) >= 200 for d in docs)
    assert len(corpus.stdlib_docstrings(min_chars=2000, max_docs=5)) == 5
    assert all(len(d) >= 2000 for d in corpus.stdlib_docstrings(min_chars=2000, max_docs=5))
    # Paragraphs of prose with the def/class headers the module promises.
    text = "\n".join(docs)
    assert "\ndef " in text and "\nclass " in text and " the " in text


def test_write_jsonl_round_trip(tmp_path, docs):
    path = tmp_path / "sub" / "corpus.jsonl"
    corpus.write_jsonl(docs[:3], path)
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line)["text"] for line in f] == docs[:3]
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"]  # no temp file left


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 300
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|endoftext|>"
    assert eos is not None and tokenizer.bos_token_id == eos
    assert tokenizer.pad_token_id == eos and tokenizer.unk_token_id == eos
    assert tokenizer.model_max_length == 128
    assert tokenizer("plain text")["input_ids"][-1] != eos  # no special tokens added


def test_tokenizer_save_reload_identical(tmp_path, docs, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.model_max_length == 128
    samples = docs[:4] + ["  unseen wörds, 日本語 and\ttabs .  \n\n end ", ""]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False, verbose=False)["input_ids"] == ids
        assert reloaded.decode(ids) == text
        assert tokenizer.decode(ids) == text


def test_tokenizer_rejects_tiny_vocab(docs):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        corpus.train_tokenizer(docs[:2], vocab_size=100)
