"""A byte-level BPE tokenizer trained with HF ``tokenizers`` on a slice of the training documents.

Byte-level means every input is representable (no unknown tokens); training on a few MB takes about a
second, so the tokenizer is trained per corpus rather than downloaded.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

END_OF_TEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE; ``END_OF_TEXT`` gets id 0 and separates documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def training_slice(keys: Sequence[str], texts: Sequence[str], max_bytes: int) -> list[str]:
    """Documents in hash order (a fixed pseudo-random sample of the corpus) up to ``max_bytes`` of text."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha1(keys[i].encode()).digest())
    chosen, total = [], 0
    for i in order:
        chosen.append(texts[i])
        total += len(texts[i])
        if total >= max_bytes:
            break
    return chosen


def encode_documents(tokenizer, texts: Sequence[str], chunk: int = 256):
    """Token ids of all documents, each followed by END_OF_TEXT, as one flat numpy array."""
    import numpy as np

    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.int32
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: skips offsets
    pieces = []
    for start in range(0, len(texts), chunk):
        for enc in encode(list(texts[start:start + chunk]), add_special_tokens=False):
            pieces.append(np.asarray(enc.ids, dtype=dtype))
            pieces.append(np.asarray([eot], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def load_tokenizer(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
