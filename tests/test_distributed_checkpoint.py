"""fp8train.distributed checkpoints in one process (no process group): round trip, conversions, clear errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fp8train
import fp8train.distributed as fd


def _model(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.LayerNorm(width), nn.Linear(width, 16))


def _trained(width: int = 64, **opt_kw):
    torch.manual_seed(0)
    model = _model(width)
    opt = fp8train.AdamW(model.parameters(), lr=1e-2, **opt_kw)
    for _ in range(2):
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _bits(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def test_round_trip_model_optimizer_and_extra(tmp_path):
    model, opt = _trained()
    rng = torch.get_rng_state()
    np_rng = np.random.default_rng(0).bit_generator.state, np.random.RandomState(0).get_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DCP single-process noise
        path = fd.save_checkpoint(tmp_path / "ck", model, opt,
                                  extra={"step": 2, "pos": (3, 4), "rng": rng, "sched": {"last_epoch": 2},
                                         "np": np_rng})
    assert sorted(p.name for p in path.iterdir() if not p.name.endswith(".distcp")) == [".metadata", "fp8train.json"]
    assert not list(tmp_path.glob(".tmp-*"))
    torch.manual_seed(1)
    model2 = _model()
    opt2 = fp8train.AdamW(model2.parameters(), lr=5.0)  # lr comes from the checkpoint's param groups
    extra = fd.load_checkpoint(path, model2, opt2)
    assert extra["step"] == 2 and extra["pos"] == (3, 4) and extra["sched"] == {"last_epoch": 2}
    assert torch.equal(extra["rng"], rng)
    assert extra["np"][0] == np_rng[0]
    restored = np.random.RandomState()
    restored.set_state(extra["np"][1])
    assert restored.randint(0, 2**31, 5).tolist() == np.random.RandomState(0).randint(0, 2**31, 5).tolist()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for p, q in zip(model.parameters(), model2.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert set(s) == set(t) and all(torch.equal(_bits(s[k]), _bits(t[k])) for k in s)
        assert t["exp_avg"].dtype == torch.float8_e4m3fn
    # both continue identically
    x = torch.randn(8, 32)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_has_no_pickled_values(tmp_path):
    model, opt = _trained()
    path = fd.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 2})
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert not [k for k, md in stored.items() if isinstance(md, BytesStorageMetadata)]
    info = json.loads((path / "fp8train.json").read_text())
    assert info["world_size"] == 1 and info["optimizer_param_groups"][0]["states"] == "dre"


def test_overwrite_is_atomic_and_incomplete_checkpoints_are_refused(tmp_path):
    model, opt = _trained()
    fd.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 1})
    fd.save_checkpoint(tmp_path / "ck", model, opt, extra={"step": 2})
    assert fd.read_checkpoint_info(tmp_path / "ck")["extra"] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (tmp_path / "ck" / "fp8train.json").unlink()  # as if killed before the end of the save
    with pytest.raises(FileNotFoundError, match="not a complete"):
        fd.load_checkpoint(tmp_path / "ck", model, opt)


def test_mismatches_are_clear_errors(tmp_path):
    model, opt = _trained()
    path = fd.save_checkpoint(tmp_path / "ck", model, opt)
    other, _ = _trained(width=48)
    with pytest.raises(ValueError, match=r"'model.0.weight' is \(64, 32\).*\(48, 32\)"):
        fd.load_checkpoint(path, other, fp8train.AdamW(other.parameters()))
    with pytest.raises(ValueError, match="states='dre' but this optimizer has states='plain'"):
        m = _model()
        fd.load_checkpoint(path, m, fp8train.AdamW(m.parameters(), states="plain"))
    model_only = fd.save_checkpoint(tmp_path / "model_only", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        fd.load_checkpoint(model_only, model, opt)
    fd.load_checkpoint(model_only, _model())  # the model alone loads


def test_torch_adamw_states_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 32)).square().mean().backward()
    opt.step()
    path = fd.save_checkpoint(tmp_path / "ck", model, opt)
    model2 = _model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    fd.load_checkpoint(path, model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
