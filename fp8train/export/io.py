"""Inputs of the export commands: the source model (run or model directory), its tokenizer, and text data.

Text data (evaluation split, calibration samples) is a text file, a directory of text files, or a ``.pt`` file
holding a LongTensor of token ids; text is tokenized with the model directory's tokenizer (or as UTF-8 bytes
when the model has none and a byte vocabulary).
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Optional

import torch

__all__ = ["find_model_dir", "load_source_model", "load_tokenizer", "load_tokens", "token_windows",
           "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h")


def find_model_dir(path) -> pathlib.Path:
    """A Hugging Face model directory (config.json + *.safetensors) at ``path``, or inside a run directory.

    In a run directory the newest checkpoint wins: ``final/``, ``model/``, then ``checkpoint*/`` / ``step*/``
    by modification time.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    candidates = [p.parent for p in path.glob("*/config.json") if any(p.parent.glob("*.safetensors"))]
    candidates += [p.parent for p in path.glob("*/*/config.json") if any(p.parent.glob("*.safetensors"))]
    if not candidates:
        raise FileNotFoundError(f"{path} is neither a model directory (config.json + *.safetensors) nor a run "
                                "directory that contains one")
    for preferred in ("final", "model"):
        for c in candidates:
            if c.name == preferred:
                return c
    return max(candidates, key=lambda c: max(f.stat().st_mtime for f in c.glob("*.safetensors")))


def load_source_model(path, device: Optional[str] = None):
    """The model of a model/run directory, in float32 (quantization starts from the exact stored weights)."""
    from transformers import AutoModelForCausalLM

    model_dir = find_model_dir(path)
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{model_dir} is already quantized ({config['quantization_config'].get('format')}); "
                         "export from the original bf16/fp32 model")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if device:
        model = model.to(device)
    return model.eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for byte-vocabulary models saved without a tokenizer)."""

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_tokenizer(model_dir):
    """The tokenizer saved with the model, else UTF-8 bytes when the vocabulary has at least 256 entries."""
    model_dir = pathlib.Path(model_dir)
    if any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return lambda text: tok(text, add_special_tokens=False)["input_ids"]
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vocab_size", 0) >= 256:
        warnings.warn(f"{model_dir} has no tokenizer; reading text as UTF-8 bytes (token ids 0..255)", stacklevel=2)
        return ByteTokenizer()
    raise FileNotFoundError(f"{model_dir} has no tokenizer files; save the tokenizer with the model or pass "
                            "token ids as a .pt file")


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
    """[n, seq_len] windows of a token stream: consecutive (seed None) or ``count`` random ones (seed given)."""
    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the data holds {ids.numel()} tokens, fewer than one window of {seq_len}")
    if seed is None:
        windows = ids[: n * seq_len].reshape(n, seq_len)
        return windows[:count] if count else windows
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count or n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
