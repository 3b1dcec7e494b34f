"""Training text: reading documents, the train/eval split, the cached token arrays and the batch order.

Default corpus: the running interpreter's standard-library sources (``sysconfig.get_paths()["stdlib"]``,
``*.py``, without site-packages) -- real text that every machine with Python has.  A document goes to the
eval split when a hash of its name (the path relative to the corpus root) falls below ``eval_fraction``,
so the split does not depend on file order or on how many files there are.

Tokens are cached under ``<cache_dir>/corpus-<key>/`` where the key hashes the corpus content and the
tokenizer settings (vocabulary size, tokenizer slice, eval fraction); the directory is written to a
temporary name and renamed, so a half-written cache is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sysconfig
import tempfile
import warnings
from typing import Optional

from .config import TrainError
from .tokenizer import encode_documents, train_bpe, training_slice

CACHE_FORMAT = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEXT_CHUNK_LINES = 200  # a single text file is split into documents of this many lines


@dataclasses.dataclass
class Documents:
    keys: list[str]
    texts: list[str]
    source: str

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, text in zip(self.keys, self.texts):
            h.update(key.encode())
            h.update(b"\0")
            h.update(text.encode())
            h.update(b"\0")
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# reading

def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _decode(raw: bytes) -> Optional[str]:
    """UTF-8 text, or None for binary (contains NUL) and non-UTF-8 files."""
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk(root: pathlib.Path, suffix: Optional[str]) -> list[pathlib.Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            files.append(pathlib.Path(dirpath) / name)
    return files


def _read_files(root: pathlib.Path, files: list[pathlib.Path], what: str) -> Documents:
    keys, texts, unreadable, empty = [], [], [], 0
    for path in files:
        try:
            text = _decode(path.read_bytes())
        except OSError:
            text = None
        if text is None:
            unreadable.append(str(path.relative_to(root)))
        elif not text.strip():
            empty += 1
        else:
            keys.append(path.relative_to(root).as_posix())
            texts.append(text)
    if not keys:
        raise TrainError(
            f"no usable text in {what}: {len(files)} file(s), {len(unreadable)} binary or not UTF-8, "
            f"{empty} empty; point --data at UTF-8 text files")
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
        warnings.warn(f"skipped {len(unreadable)} binary or non-UTF-8 file(s) in {what}: {shown}", stacklevel=2)
    return Documents(keys, texts, what)


def _read_jsonl(path: pathlib.Path, field: str) -> Documents:
    keys, texts, bad, missing = [], [], 0, 0
    raw = path.read_bytes()
    text = _decode(raw)
    if text is None:
        raise TrainError(f"{path} is binary or not UTF-8; --data needs UTF-8 text or JSON lines")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            missing += 1
            continue
        keys.append(f"{path.name}:{lineno}")
        texts.append(value)
    if not keys:
        raise TrainError(f"no usable records in {path}: {bad} line(s) are not JSON, {missing} have no text in "
                         f"field {field!r}; set --text-field to the field that holds the text")
    if bad or missing:
        warnings.warn(f"skipped {bad} invalid JSON line(s) and {missing} record(s) without a {field!r} string "
                      f"in {path}", stacklevel=2)
    return Documents(keys, texts, str(path))


def _read_text_file(path: pathlib.Path) -> Documents:
    text = _decode(path.read_bytes())
    if text is None:
        raise TrainError(f"{path} is binary or not UTF-8; --data needs UTF-8 text")
    if not text.strip():
        raise TrainError(f"{path} is empty; --data needs some text")
    lines = text.splitlines(keepends=True)
    keys, texts = [], []
    for k, start in enumerate(range(0, len(lines), _TEXT_CHUNK_LINES)):
        chunk = "".join(lines[start:start + _TEXT_CHUNK_LINES])
        if chunk.strip():
            keys.append(f"{path.name}#{k}")
            texts.append(chunk)
    return Documents(keys, texts, str(path))


def read_documents(data: Optional[str], text_field: str = "text") -> Documents:
    """The corpus named by ``--data`` (None: the standard library's *.py files)."""
    if data is None:
        root = stdlib_root()
        return _read_files(root, _walk(root, ".py"), f"the Python standard library ({root})")
    path = pathlib.Path(data).expanduser()
    if not path.exists():
        raise TrainError(f"data path {data!r} does not exist; pass a text file, a directory or a .jsonl file")
    if path.is_dir():
        files = _walk(path, None)
        if not files:
            raise TrainError(f"data directory {data!r} is empty; it needs UTF-8 text files")
        return _read_files(path, files, f"directory {data}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_text_file(path)


def is_eval_key(key: str, eval_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
    return bucket < eval_fraction


# ----------------------------------------------------------------------------------------------------------
# tokens (cached)

@dataclasses.dataclass
class Corpus:
    train_tokens: "object"  # numpy array (memory-mapped)
    eval_tokens: "object"
    tokenizer_path: pathlib.Path
    meta: dict


def prepare_corpus(data: Optional[str], text_field: str, vocab_size: int, eval_fraction: float,
                   tokenizer_train_bytes: int, cache_dir: str, log=print) -> Corpus:
    """Read, split, train the tokenizer and tokenize -- or load all of that from the cache."""
    import numpy as np

    docs = read_documents(data, text_field)
    settings = {"format": CACHE_FORMAT, "corpus": docs.fingerprint(), "vocab_size": vocab_size,
                "eval_fraction": eval_fraction, "tokenizer_train_bytes": tokenizer_train_bytes}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    cache = pathlib.Path(cache_dir).expanduser() / f"corpus-{key}-v{vocab_size}"
    if not (cache / "meta.json").is_file():
        log(f"tokenizing {len(docs.keys)} documents from {docs.source} (cached in {cache})")
        _build_cache(docs, settings, cache)
    meta = json.loads((cache / "meta.json").read_text())
    return Corpus(np.load(cache / "train.npy", mmap_mode="r", allow_pickle=False),
                  np.load(cache / "eval.npy", mmap_mode="r", allow_pickle=False),
                  cache / "tokenizer.json", meta)


def _build_cache(docs: Documents, settings: dict, cache: pathlib.Path) -> None:
    import numpy as np

    is_eval = [is_eval_key(k, settings["eval_fraction"]) for k in docs.keys]
    train = [(k, t) for k, t, e in zip(docs.keys, docs.texts, is_eval) if not e]
    held_out = [t for t, e in zip(docs.texts, is_eval) if e]
    if not train:  # tiny corpora: keep at least one training document
        train, held_out = list(zip(docs.keys, docs.texts)), []
    train_keys = [k for k, _ in train]
    train_texts = [t for _, t in train]
    tokenizer = train_bpe(training_slice(train_keys, train_texts, settings["tokenizer_train_bytes"]),
                          settings["vocab_size"])
    train_tokens = encode_documents(tokenizer, train_texts)
    eval_tokens = encode_documents(tokenizer, held_out)
    meta = {**settings, "source": docs.source, "documents": len(docs.keys), "eval_documents": len(held_out),
            "train_tokens": int(train_tokens.size), "eval_tokens": int(eval_tokens.size),
            "tokenizer_vocab_size": tokenizer.get_vocab_size(),
            "bytes": sum(len(t.encode()) for t in docs.texts)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "train.npy", train_tokens, allow_pickle=False)
        np.save(tmp / "eval.npy", eval_tokens, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, cache)
        except OSError:  # another process built the same cache first: use theirs
            if not (cache / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_for_training(corpus: Corpus, seq_len: int):
    """(train, eval) token arrays with at least one window each; tiny corpora lend eval the train tail."""
    train, held_out = corpus.train_tokens, corpus.eval_tokens
    window = seq_len + 1
    if held_out.size < window:
        take = max(window, train.size // 10)
        if train.size - take < window:
            raise TrainError(f"not enough text: {train.size + held_out.size} tokens after tokenization, but "
                             f"--seq-len {seq_len} needs at least {2 * window}; add data or lower --seq-len")
        warnings.warn(f"the held-out documents give fewer than {window} tokens; using the last {take} "
                      f"training tokens for evaluation instead", stacklevel=2)
        train, held_out = train[:-take], train[-take:]
    return train, held_out


# ----------------------------------------------------------------------------------------------------------
# batches

class WindowSampler:
    """Random non-overlapping windows of ``seq_len + 1`` tokens, a fresh permutation each epoch.

    The order depends only on (seed, epoch), and the position is two integers, so a checkpoint restores
    it exactly.
    """

    def __init__(self, tokens, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (tokens.size - 1) // seq_len
        if self.num_windows < 1:
            raise TrainError(f"training data has {tokens.size} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int):
        import numpy as np

        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def next_batch(self, batch_size: int):
        import numpy as np
        import torch

        rows = []
        for _ in range(batch_size):
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            start = int(self._order[self.index]) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
            self.index += 1
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != self.num_windows or state["seq_len"] != self.seq_len:
            warnings.warn("the data or --seq-len changed since the checkpoint; the batch order will differ",
                          stacklevel=2)
        self.epoch, self.index = int(state["epoch"]), min(int(state["index"]), self.num_windows)
        self._order = self._permutation(self.epoch)


def eval_batches(tokens, seq_len: int, batch_size: int, max_batches: int) -> list:
    """Fixed evaluation windows spread evenly over the held-out tokens."""
    import numpy as np
    import torch

    available = (tokens.size - 1) // seq_len
    count = min(available, batch_size * max_batches)
    picks = np.linspace(0, available - 1, count).round().astype(np.int64) if count > 1 else np.zeros(1, np.int64)
    rows = [np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in picks]
    return [torch.from_numpy(np.stack(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]
