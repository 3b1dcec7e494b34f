"""Inputs of the export commands: the source model, its tokenizer, and token data.

A source is either

* a Hugging Face model directory (``config.json`` + ``*.safetensors``, e.g. from ``save_pretrained``), or
* an ``fp8train train`` run directory: ``config.json`` (``{"train": ..., "model": <HF config>, ...}``),
  ``tokenizer.json`` and ``checkpoints/step_*/model.safetensors`` (the newest complete checkpoint is used:
  its ``manifest.json`` lists every file with its size).  Its training corpus gives the calibration samples
  (train split) and the evaluation tokens (eval split), through ``fp8train.train.data``.

Text data given explicitly (``--data``, ``--calibration-data``) is a text file, a directory of text files, or a
``.pt`` file holding a LongTensor of token ids; text is tokenized with the source's tokenizer (or as UTF-8
bytes for a byte-vocabulary model saved without one).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import warnings
from typing import Callable, Optional

import torch

__all__ = ["Source", "open_source", "find_model_dir", "load_source_model", "load_tokens", "token_windows",
           "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class Source:
    path: pathlib.Path  # what was given
    kind: str  # "model" | "run"
    weights: pathlib.Path  # the safetensors file (run) or the model directory (model)
    config: dict  # Hugging Face config of the model
    train: Optional[dict] = None  # the run's training settings
    tokenizer_file: Optional[pathlib.Path] = None

    @property
    def quantized(self) -> bool:
        return "quantization_config" in self.config

    @property
    def files_dir(self) -> pathlib.Path:
        """Where tokenizer / generation config files to copy into an export live."""
        return self.path

    def load_model(self, device: Optional[str] = None):
        """The model in float32 (quantization starts from the exact stored weights), in eval mode."""
        if self.quantized:
            raise ValueError(f"{self.path} is already quantized ({self.config['quantization_config'].get('format')}); "
                             "export from the original bf16/fp32 model")
        if self.kind == "model":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(self.weights), dtype=torch.float32)
        else:
            from safetensors.torch import load_model

            from .simulate import empty_model

            model = empty_model(self.config)
            missing, unexpected = load_model(model, str(self.weights), strict=False)
            missing = [k for k in missing if not k.endswith("inv_freq")]
            if missing:
                raise KeyError(f"{self.weights} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
            if unexpected:
                warnings.warn(f"{self.weights}: ignoring {len(unexpected)} tensors the model does not have, e.g. "
                              f"{unexpected[:3]}", stacklevel=2)
        if device:
            model = model.to(device)
        return model.eval()

    def tokenizer(self) -> Callable[[str], list]:
        """text -> token ids with the source's tokenizer (UTF-8 bytes for a byte model without one)."""
        if self.tokenizer_file is not None and self.kind == "run":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.tokenizer_file))
            return lambda text: tok.encode(text, add_special_tokens=False).ids
        d = self.path
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d))
            return lambda text: tok(text, add_special_tokens=False)["input_ids"]
        if self.config.get("vocab_size", 0) >= 256:
            warnings.warn(f"{d} has no tokenizer; reading text as UTF-8 bytes (token ids 0..255)", stacklevel=2)
            return lambda text: list(text.encode("utf-8"))
        raise FileNotFoundError(f"{d} has no tokenizer files; save the tokenizer with the model or pass token ids "
                                "as a .pt file")

    def corpus_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, eval) token ids of a run's corpus, exactly as ``fp8train train`` split and tokenized it."""
        if self.kind != "run":
            raise ValueError(f"{self.path} is a model directory, not an fp8train run: give the data explicitly "
                             "(--data / --calibration-data)")
        try:
            from ..train.data import prepare_corpus, split_for_training
        except ImportError as exc:  # pragma: no cover - the train package ships with fp8train
            raise RuntimeError("reading a run's corpus needs fp8train.train; give --data / --calibration-data") from exc
        t = self.train
        corpus = prepare_corpus(t.get("data"), t.get("text_field", "text"), t["vocab_size"], t["eval_fraction"],
                                t["tokenizer_train_bytes"], t["cache_dir"], log=lambda *_: None)
        train, held_out = split_for_training(corpus, t["seq_len"])
        as_tensor = lambda a: torch.from_numpy(a.astype("int64"))  # noqa: E731 - numpy memmap -> LongTensor
        return as_tensor(train), as_tensor(held_out)


def _latest_checkpoint(run: pathlib.Path) -> Optional[pathlib.Path]:
    """Newest ``checkpoints/step_*`` whose manifest lists files that all exist with the right sizes."""
    root = run / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in reversed(steps):
        manifest = path / "manifest.json"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            warnings.warn(f"skipping incomplete checkpoint {path} (no readable manifest.json)", stacklevel=3)
            continue
        if all((path / n).is_file() and (path / n).stat().st_size == size for n, size in files.items()) \
                and (path / "model.safetensors").is_file():
            return path
        warnings.warn(f"skipping damaged checkpoint {path}", stacklevel=3)
    return None


def open_source(path) -> Source:
    """Recognize a model directory or a run directory (also a model directory nested one or two levels down)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if "train" in config and "model" in config:  # an fp8train run
            checkpoint = _latest_checkpoint(path)
            if checkpoint is None:
                raise FileNotFoundError(f"{path} is an fp8train run without a complete checkpoint in "
                                        f"{path / 'checkpoints'}; train (or resume) it first")
            tok = path / "tokenizer.json"
            return Source(path, "run", checkpoint / "model.safetensors", config["model"], config["train"],
                          tok if tok.is_file() else None)
        if any(path.glob("*.safetensors")):
            return Source(path, "model", path, config)
    nested = [p.parent for pattern in ("*/config.json", "*/*/config.json") for p in path.glob(pattern)
              if any(p.parent.glob("*.safetensors"))]
    if not nested:
        raise FileNotFoundError(f"{path} is neither a model directory (config.json + *.safetensors) nor an "
                                "fp8train run directory (config.json + checkpoints/)")
    for preferred in ("final", "model"):
        for c in nested:
            if c.name == preferred:
                return open_source(c)
    return open_source(max(nested, key=lambda c: max(f.stat().st_mtime for f in c.glob("*.safetensors"))))


def find_model_dir(path) -> pathlib.Path:
    """The directory :func:`open_source` reads the model from (a run's checkpoint directory for runs)."""
    source = open_source(path)
    return source.weights.parent if source.kind == "run" else source.weights


def load_source_model(path, device: Optional[str] = None):
    return open_source(path).load_model(device)


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def load_tokens(path, tokenizer=None, max_tokens: Optional[int] = None) -> torch.Tensor:
    """A 1-D LongTensor of token ids from a ``.pt`` tensor, a text file or a directory of text files."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{path} must hold an integer tensor of token ids")
        ids = ids.reshape(-1).long()
        return ids[:max_tokens] if max_tokens else ids
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to read text data")
    pieces, total = [], 0
    for f in _text_files(path):
        ids = tokenizer(f.read_text(encoding="utf-8", errors="replace"))
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens and total >= max_tokens:
            break
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return ids[:max_tokens] if max_tokens else ids


def token_windows(ids: torch.Tensor, seq_len: int, count: Optional[int] = None, *, seed: Optional[int] = None
                  ) -> torch.Tensor:
    """[n, seq_len] windows of a token stream.

    ``count`` None: every consecutive window.  ``count`` given: that many windows spread evenly over the whole
    stream (``seed`` None; deterministic, like ``fp8train train``'s evaluation windows) or at random start
    positions (``seed`` given; calibration samples).
    """
    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the data holds {ids.numel()} tokens, fewer than one window of {seq_len}")
    if count is None:
        return ids[: n * seq_len].reshape(n, seq_len)
    if seed is None:
        picks = torch.linspace(0, n - 1, min(count, n)).round().long()
        return ids[: n * seq_len].reshape(n, seq_len)[picks]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
