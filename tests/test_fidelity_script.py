"""benchmarks/fidelity.py's arithmetic: gaps paired with bf16 of the same seed, their mean and standard error."""

import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity.py"
_spec = importlib.util.spec_from_file_location("fidelity_script", _path)
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def _row(setup, seed, loss, status="ok"):
    return {"setup": setup, "seed": seed, "status": status, "final_eval_loss": loss}


def test_gaps_are_paired_by_seed():
    rows = [_row("bf16", 0, 4.0), _row("coat", 0, 4.04), _row("bf16", 1, 5.0), _row("coat", 1, 4.95),
            _row("coat-lean", 0, 4.0), _row("coat-lean", 1, 0.0, status="error")]
    gaps = fidelity.paired_gaps(rows)
    assert gaps["coat"]["gaps"] == [1.0, -1.0]
    assert gaps["coat"]["mean"] == 0.0
    assert gaps["coat"]["stderr"] == pytest.approx(1.0, abs=1e-3)  # stdev sqrt(2) over sqrt(2) seeds
    assert gaps["coat-lean"] == {"gaps": [0.0], "mean": 0.0, "stderr": None}  # the failed seed is left out


def test_gpu_names_become_short_file_stems():
    assert fidelity.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert fidelity.gpu_slug("NVIDIA H200") == "h200"
    assert fidelity.gpu_slug("cpu") == "cpu"
