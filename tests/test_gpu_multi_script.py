"""benchmarks/gpu_multi.py's arithmetic: 1 -> 2 GPU scaling from repeated, interleaved runs (medians, per round)."""

import importlib.util
import pathlib

_path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_multi.py"
_spec = importlib.util.spec_from_file_location("gpu_multi_script", _path)
gpu_multi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_multi)


def _row(gpus, tokens_per_s, round_=0, status="ok", batch=4, reduce="fp32"):
    return {"recipe": "coat", "model": "1b", "gpus": gpus, "batch_per_gpu": batch, "master": "fp32",
            "reduce_dtype": reduce, "tokens_per_s": tokens_per_s, "status": status, "round": round_}


def test_scaling_uses_each_sides_median_and_reports_each_round():
    rows = [_row(1, 100.0, 0), _row(2, 180.0, 0), _row(1, 140.0, 1), _row(2, 190.0, 1), _row(1, 110.0, 2),
            _row(2, 150.0, 2), _row(1, 0.0, 3, status="oom")]
    (entry,) = gpu_multi.scaling(rows)
    assert entry["tokens_per_s_1gpu"] == 110 and entry["tokens_per_s_2gpu"] == 180
    assert entry["efficiency"] == round(180 / 220, 3) and entry["runs"] == [3, 3]
    assert entry["efficiency_per_round"] == [0.9, round(190 / 280, 3), round(150 / 220, 3)]


def test_setups_are_paired_only_with_their_own_one_gpu_runs():
    rows = [_row(1, 100.0), _row(2, 190.0), _row(1, 200.0, batch=8), _row(2, 300.0, batch=8),
            _row(2, 150.0, reduce="bf16")]  # no 1-GPU run of the bf16-reduce setup: no entry
    entries = {(e["batch_per_gpu"], e["reduce_dtype"]): e for e in gpu_multi.scaling(rows)}
    assert set(entries) == {(4, "fp32"), (8, "fp32")}
    assert entries[(4, "fp32")]["efficiency"] == 0.95 and entries[(8, "fp32")]["efficiency"] == 0.75
    assert "efficiency_per_round" not in entries[(4, "fp32")]  # one round: nothing to list


def test_cuda_graph_rows_pair_with_cuda_graph_rows():
    rows = [_row(1, 100.0), _row(2, 150.0), {**_row(1, 200.0), "cuda_graph": True}, {**_row(2, 380.0), "cuda_graph": True}]
    entries = {e["cuda_graph"]: e for e in gpu_multi.scaling(rows)}
    assert entries[False]["efficiency"] == 0.75 and entries[True]["efficiency"] == 0.95
    assert "| CUDA graph |" in gpu_multi.to_markdown({"date": "d", "gpus": 2, "gpu": "g", "torch": "t", "cuda": "c",
                                                      "triton": "x", "rows": [], "scaling": list(entries.values()),
                                                      "checks": [{"name": "graph", "ok": None}]})
