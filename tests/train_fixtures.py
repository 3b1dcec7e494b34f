"""Shared helpers for the tests/test_train_*.py files: a tiny text corpus and a tiny, fast run config."""

from __future__ import annotations

import pathlib
import random

WORDS = ("def class return import from self value result items index count total name data "
         "for while if else elif try except raise with as lambda yield None True False print len range").split()


def write_corpus(root: pathlib.Path, files: int = 24, lines: int = 60, seed: int = 0) -> pathlib.Path:
    """Python-looking text files (deterministic), enough for a few hundred 32-token windows."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = []
        for j in range(lines):
            indent = "    " * rng.randint(0, 2)
            body.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + f"  # {i}.{j}")
        (root / f"module_{i:02d}.py").write_text("\n".join(body) + "\n")
    return root


def tiny_config(tmp_path: pathlib.Path, **overrides):
    from fp8train.train.config import TrainConfig

    data = tmp_path / "corpus"
    if not data.exists():
        write_corpus(data)
    settings = dict(model="micro", vocab_size=300, steps=6, batch_size=4, seq_len=32, eval_batches=2,
                    eval_every=3, checkpoint_every=2, data=str(data), cache_dir=str(tmp_path / "cache"),
                    out=str(tmp_path / "run"), tokenizer_train_bytes=20_000, progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)
