"""Corpus reading, the hash split, the token cache and the resumable batch order."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from fp8train.train import TrainError
from fp8train.train.data import (WindowSampler, eval_batches, is_eval_key, prepare_corpus, read_documents,
                                 split_for_training)

from train_fixtures import write_corpus


def test_directory_skips_binary_and_non_utf8_with_a_warning(tmp_path):
    write_corpus(tmp_path, files=3)
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.py").write_text("  \n")
    with pytest.warns(UserWarning, match="skipped 2 binary or non-UTF-8") as record:
        docs = read_documents(str(tmp_path))
    assert "blob.bin" in str(record[0].message) and "latin1.txt" in str(record[0].message)
    assert docs.keys == ["module_00.py", "module_01.py", "module_02.py"]


def test_unusable_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        read_documents(str(tmp_path / "missing"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TrainError, match="is empty"):
        read_documents(str(tmp_path / "emptydir"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrainError, match="is empty"):
        read_documents(str(tmp_path / "empty.txt"))
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "a.dat").write_bytes(bytes(range(256)))
    (binary / "b.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(TrainError, match="no usable text.*2 binary or not UTF-8"):
        read_documents(str(binary))


def test_jsonl_uses_the_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"document {i}", "id": i}) for i in range(5)] + ["not json", json.dumps({"x": 1})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="1 invalid JSON line.*1 record"):
        docs = read_documents(str(path))
    assert docs.texts == [f"document {i}" for i in range(5)]
    with pytest.raises(TrainError, match="--text-field"):
        read_documents(str(path), text_field="body")


def test_single_text_file_is_chunked_into_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(450)))
    docs = read_documents(str(path))
    assert docs.keys == ["book.txt#0", "book.txt#1", "book.txt#2"]
    assert "".join(docs.texts) == path.read_text()


def test_split_depends_only_on_the_name():
    keys = [f"pkg/module_{i}.py" for i in range(4000)]
    held = [k for k in keys if is_eval_key(k, 0.05)]
    assert 0.035 < len(held) / len(keys) < 0.065
    assert held == [k for k in reversed(keys) if is_eval_key(k, 0.05)][::-1]
    assert set(held) <= {k for k in keys if is_eval_key(k, 0.10)}


def test_stdlib_corpus_is_found():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = read_documents(None)
    assert len(docs.keys) > 500 and "os.py" in docs.keys
    assert not any("site-packages" in k for k in docs.keys)


def test_token_cache_is_reused_and_keyed_by_vocab(tmp_path):
    data = write_corpus(tmp_path / "corpus", files=6)
    args = dict(text_field="text", eval_fraction=0.2, tokenizer_train_bytes=10_000, cache_dir=str(tmp_path / "c"))
    messages = []
    first = prepare_corpus(str(data), vocab_size=300, log=messages.append, **args)
    again = prepare_corpus(str(data), vocab_size=300, log=messages.append, **args)
    assert len(messages) == 1  # the second call only read the cache
    assert np.array_equal(first.train_tokens, again.train_tokens)
    other = prepare_corpus(str(data), vocab_size=320, log=messages.append, **args)
    assert len(messages) == 2 and other.tokenizer_path != first.tokenizer_path
    (data / "module_00.py").write_text("changed\n")
    prepare_corpus(str(data), vocab_size=300, log=messages.append, **args)
    assert len(messages) == 3  # content changed: new fingerprint
    assert first.train_tokens.max() < 300 and first.meta["eval_documents"] >= 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(first.tokenizer_path))
    eot = tok.token_to_id("<|endoftext|>")
    assert int((np.asarray(first.train_tokens) == eot).sum()) == first.meta["documents"] - first.meta["eval_documents"]


def test_tiny_corpus_lends_eval_the_train_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("print('hello world')\n" * 200)
    corpus = prepare_corpus(str(path), "text", 300, 0.05, 10_000, str(tmp_path / "c"), log=lambda s: None)
    with pytest.warns(UserWarning, match="for evaluation"):
        train, held_out = split_for_training(corpus, 16)
    assert train.size + held_out.size == corpus.train_tokens.size + corpus.eval_tokens.size
    with pytest.raises(TrainError, match="lower --seq-len"):
        split_for_training(corpus, 10_000)


def test_sampler_resumes_exactly_and_covers_each_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    sampler = WindowSampler(tokens, seq_len=10, seed=3)
    assert sampler.num_windows == 100
    first_epoch = np.concatenate([sampler.next_batch(7)[:, 0].numpy() for _ in range(15)])[:100]
    assert sorted(first_epoch // 10) == list(range(100))
    state = sampler.state_dict()
    expected = [sampler.next_batch(7) for _ in range(20)]
    fresh = WindowSampler(tokens, seq_len=10, seed=3)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    got = [fresh.next_batch(7) for _ in range(20)]
    assert all((a == b).all() for a, b in zip(expected, got))
    batch = expected[0]
    assert batch.shape == (7, 11) and (batch[:, 1:] - batch[:, :-1] == 1).all()
    assert not (WindowSampler(tokens, 10, seed=4).next_batch(7) == WindowSampler(tokens, 10, 3).next_batch(7)).all()


def test_eval_batches_are_fixed_and_spread():
    tokens = np.arange(501, dtype=np.uint16)
    batches = eval_batches(tokens, seq_len=10, batch_size=4, max_batches=3)
    starts = np.concatenate([b[:, 0].numpy() for b in batches])
    assert [b.shape[0] for b in batches] == [4, 4, 4]
    assert starts[0] == 0 and starts[-1] == 490 and len(set(starts)) == 12
