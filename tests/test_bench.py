"""fp8train bench's batch search (the GPU runs themselves are replaced by a fake that 'fits' up to a batch)."""

import argparse

import pytest

from fp8train.bench import largest_batch_rows


def fake_runner(fits_up_to: int, calls: list):
    def run(name, args):
        calls.append(args.batch)
        status = "ok" if args.batch <= fits_up_to else "oom"
        return {"name": name, "batch": args.batch, "status": status,
                "tokens_per_s": 1000.0 * args.batch if status == "ok" else 0.0}
    return run


def args(batch=4):
    return argparse.Namespace(batch=batch, model="1b", seq=2048, steps=8, warmup=3, master="fp32", timeout=400)


def test_doubles_until_out_of_memory_then_bisects_once():
    calls = []
    rows = largest_batch_rows("x", args(4), run=fake_runner(24, calls))
    assert calls == [4, 8, 16, 32, 24]
    assert [r["batch"] for r in rows if r.get("max_batch")] == [24]


def test_start_batch_already_too_large_marks_nothing():
    calls = []
    rows = largest_batch_rows("x", args(8), run=fake_runner(4, calls))
    assert calls == [8] and not any(r.get("max_batch") for r in rows)


def test_a_crash_that_is_not_out_of_memory_stops_the_search():
    calls = []

    def run(name, a):
        calls.append(a.batch)
        return {"name": name, "batch": a.batch, "status": "ok" if a.batch < 8 else "error", "tokens_per_s": 1.0}

    rows = largest_batch_rows("x", args(4), run=run)
    assert calls == [4, 8] and not any(r.get("max_batch") for r in rows)


def test_stops_at_the_limit():
    calls = []
    rows = largest_batch_rows("x", args(4), run=fake_runner(10**6, calls), limit=32)
    assert calls == [4, 8, 16, 32] and [r["batch"] for r in rows if r.get("max_batch")] == [32]


def test_configuration_names_combine_recipe_levers_in_any_order():
    from fp8train.bench import parse_config

    assert parse_config("bf16_compiled") == ("bf16_compiled", {}, False)
    base, levers, graphed = parse_config("fp8train_coat_lean_fused_qkv_saved_product_graphed")
    assert (base, graphed) == ("fp8train_coat_lean", True)
    assert levers == {"fused_qkv": True, "recompute_gated_product": False}
    assert parse_config("fp8train_coat_lean_saved_product_fused_qkv")[1] == levers
    assert parse_config("fp8train_coat_lean_no_weight_cache_recomputed_product_graphed") == (
        "fp8train_coat_lean", {"recompute_gated_product": True, "cache_fp8_weights": False}, True)
    assert parse_config("fp8train_coat_lean_fast_accumulation_graphed") == (
        "fp8train_coat_lean", {"fast_accumulation": True}, True)
    assert parse_config("fp8train_coat_lean_fast_accumulation_loss_chunk_8192_graphed") == (
        "fp8train_coat_lean", {"fast_accumulation": True, "loss_chunk_rows": 8192}, True)
    assert parse_config("fp8train_coat_lean_loss_chunk_12000_saved_attention_output_graphed") == (
        "fp8train_coat_lean", {"loss_chunk_rows": 12000, "requantize_attention_output": False}, True)
    with pytest.raises(ValueError, match="unknown bench configuration"):
        parse_config("fp8train_coat_lean_loss_chunk_0")
    # a configuration whose own name ends like a lever is still its own base
    assert parse_config("fp8train_coat_lean_step_in_backward") == ("fp8train_coat_lean_step_in_backward", {}, False)
    with pytest.raises(ValueError, match="unknown bench configuration 'fp8train_coat_lean_typo'"):
        parse_config("fp8train_coat_lean_typo")


def test_results_file_is_an_object_with_versions_and_rows_that_accumulate(tmp_path):
    import json

    from fp8train.bench import write_results

    row = {"name": "bf16_compiled", "model": "1b", "batch": 4, "seq": 2048, "tokens_per_s": 81135.0,
           "peak_memory_bytes": 24.73e9, "status": "ok"}
    path = write_results([row], str(tmp_path), "1b", "NVIDIA H100 80GB HBM3", date="2026-11-27")
    assert path.endswith("2026-11-27-h100.json")
    second = dict(row, name="fp8train_coat_lean_graphed", tokens_per_s=102796.0)
    write_results([second], str(tmp_path), "1b", "NVIDIA H100 80GB HBM3", date="2026-11-27")
    result = json.loads((tmp_path / "2026-11-27-h100.json").read_text())
    assert result["gpu"] == "NVIDIA H100 80GB HBM3" and result["date"] == "2026-11-27" and "torch" in result
    assert [r["name"] for r in result["end_to_end"]] == ["bf16_compiled", "fp8train_coat_lean_graphed"]
    assert "102,796" in (tmp_path / "2026-11-27-h100.md").read_text()
    assert json.loads((tmp_path / "bench-1b.json").read_text()) == [second]


def test_repeats_interleave_configurations_and_keep_each_ones_fastest_run():
    from fp8train.bench import repeated_rows

    order, speeds = [], {"a": iter([50.0, 70.0, 60.0]), "b": iter([10.0, 30.0, 20.0])}

    def run(name, a):
        order.append(name)
        return {"name": name, "batch": a.batch, "status": "ok", "tokens_per_s": next(speeds[name])}

    rows = repeated_rows(["a", "b"], argparse.Namespace(**vars(args()), repeat=3), run=run)
    assert order == ["a", "b"] * 3  # interleaved: a slow spell of the host slows both alike
    assert [(r["name"], r["tokens_per_s"], r["tokens_per_s_median"], r["repeats"]) for r in rows] == [
        ("a", 70.0, 60.0, 3), ("b", 30.0, 20.0, 3)]
    assert rows[0]["tokens_per_s_runs"] == [50.0, 70.0, 60.0]


def test_a_single_run_is_reported_as_it_is_and_failed_repeats_do_not_count():
    from fp8train.bench import repeated_rows

    one = repeated_rows(["a"], argparse.Namespace(**vars(args()), repeat=1),
                        run=lambda n, a: {"name": n, "status": "ok", "tokens_per_s": 5.0})
    assert one == [{"name": "a", "status": "ok", "tokens_per_s": 5.0}]
    statuses = iter(["oom", "ok"])
    rows = repeated_rows(["a"], argparse.Namespace(**vars(args()), repeat=2),
                         run=lambda n, a: {"name": n, "status": (s := next(statuses)),
                                           "tokens_per_s": 9.0 if s == "ok" else 0.0})
    assert rows[0]["status"] == "ok" and rows[0]["tokens_per_s_median"] == 9.0
    assert rows[0]["tokens_per_s_runs"] == [0.0, 9.0]


def test_memory_cap_reaches_the_child_process_and_an_impossible_cap_is_refused(monkeypatch):
    import subprocess
    import types

    import torch

    from fp8train import bench

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return types.SimpleNamespace(stdout='BENCH_ROW {"name": "x", "status": "ok"}\n', stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    a = args(40)
    a.masks, a.memory_limit_gb = "plain-causal", 84.5
    assert bench.run_isolated("x", a)["status"] == "ok"
    assert seen["cmd"][-2:] == ["--memory-limit-gb", "84.5"]

    fractions = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=150e9))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fractions.append)
    bench.limit_memory(75.0)
    assert fractions == [0.5]
    with pytest.raises(SystemExit, match="150.0 GB"):
        bench.limit_memory(200.0)
