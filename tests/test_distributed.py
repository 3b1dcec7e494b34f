"""FSDP2 + fp8train.AdamW + DCP checkpoints on CPU (gloo), with real worker processes.

One 2-rank run trains a converted (coat) tiny Llama for 4 steps and checkpoints after step 2; the tests load
that checkpoint on 1 rank (sharded and unsharded) and on 2 ranks, compare every model and optimizer tensor with
the state the 2-rank run had when it saved, and continue training: the losses must be those of the
uninterrupted run.  A 1-rank unsharded run's checkpoint is loaded on 4 ranks.  Workers: distributed_worker.py.
"""

from __future__ import annotations

import pytest
import torch

import distributed_worker as worker
from fp8train.optim import moment_storage as storage

pytestmark = pytest.mark.slow
SAVE_AT, STOP = 2, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three launches (2, 1 and 4 ranks); results and full states keyed by name."""
    root = tmp_path_factory.mktemp("dist")
    ckpt2, ckpt1 = str(root / "from2" / "step2"), str(root / "from1" / "step2")

    def task(kind, name, ckpt, **kw):
        return dict(kind=kind, ckpt=ckpt, stop=STOP, state_out=str(root / f"{name}.pt"), **kw)

    plan = {
        2: [("run2", task("train_save", "run2", ckpt2, save_at=SAVE_AT)),
            ("reload2", task("load_continue", "reload2", ckpt2)),
            ("run2_fused_qkv", task("train_save", "run2_fused_qkv", str(root / "fused2" / "step2"), save_at=SAVE_AT,
                                    fused_qkv=True)),
            ("run2_two_layers_per_unit", task("train_save", "run2_two_layers_per_unit", str(root / "units2" / "step2"),
                                              save_at=SAVE_AT, layers_per_unit=2))],
        1: [("run1_fused_qkv_unsharded", task("train_save", "run1_fused_qkv_unsharded", str(root / "fused1" / "step2"),
                                              save_at=SAVE_AT, shard=False, fused_qkv=True)),
            ("load1", task("load_continue", "load1", ckpt2)),
            ("load1_unsharded", task("load_continue", "load1_unsharded", ckpt2, shard=False)),
            ("run1_unsharded", task("train_save", "run1_unsharded", ckpt1, save_at=SAVE_AT, shard=False))],
        4: [("load4", task("load_continue", "load4", ckpt1))],
    }
    out = {}
    for world, tasks in plan.items():
        results = worker.run(world, [t for _, t in tasks], str(root / f"result{world}"))
        for (name, t), result in zip(tasks, results):
            out[name] = dict(result, state=torch.load(t["state_out"], weights_only=True))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _equal_states(a: dict, b: dict) -> list:
    return [k for k in a if not torch.equal(_bits(a[k]), _bits(b[k]))]


def _moments(state: dict, prefix: str) -> dict:
    """Decoded float32 moments of one parameter from a full state (FP8 with metadata, or float32)."""
    entries = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mode = "dre" if "exp_avg_k" in entries else "plain" if "exp_avg_amax" in entries else "fp32"
    return {name: storage.decode(entries, name, mode, "e4m3", 128) for name in storage.MOMENT_NAMES}


def test_sharded_training_state_is_sharded_like_the_parameters(runs):
    result = runs["run2"]
    assert result["fsdp_units"] == ["<root>", "model.layers.0", "model.layers.1"]  # one unit per decoder layer
    assert runs["run1_unsharded"]["fsdp_units"] == []
    assert result["state_types"] == ["DTensor"]
    dtypes = result["moment_dtypes"]
    # matrices keep FP8 moments; 1-D parameters (sharded along their only dim) keep float32 ones
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "torch.float8_e4m3fn"
    assert dtypes["model.embed_tokens.weight"] == "torch.float8_e4m3fn"
    assert dtypes["model.norm.weight"] == "torch.float32"
    assert dtypes["model.layers.1.input_layernorm.weight"] == "torch.float32"
    assert runs["run1_unsharded"]["moment_dtypes"]["model.norm.weight"] == "torch.float8_e4m3fn"
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.1  # it trains


def test_two_rank_checkpoint_reloads_on_two_ranks_bit_for_bit(runs):
    run, reload = runs["run2"], runs["reload2"]
    assert set(reload["state"]) == set(run["state"])
    assert _equal_states(run["state"], reload["state"]) == []
    assert reload["losses"] == run["losses"][SAVE_AT:]


def test_two_rank_checkpoint_loads_on_one_rank_and_continues(runs):
    run, load = runs["run2"], runs["load1"]
    assert set(load["state"]) == set(run["state"])
    assert _equal_states(run["state"], load["state"]) == []  # weights and FP8 moments bit for bit
    # FSDP on one rank vs two: the same micro-batches, only the gradient summation order differs
    torch.testing.assert_close(load["losses"], run["losses"][SAVE_AT:], rtol=1e-5, atol=0)


def test_sharded_checkpoint_loads_into_an_unsharded_model(runs):
    """The 1-D parameters' float32 moments are re-encoded to FP8 (DRE) for the unsharded optimizer."""
    run, load = runs["run2"], runs["load1_unsharded"]
    reference, state = run["state"], load["state"]
    one_d = {k.rsplit(".", 1)[0] for k, v in reference.items()
             if k.startswith("optim.") and k.endswith(".exp_avg") and v.dtype == torch.float32}
    assert "optim.model.norm.weight" in one_d and len(one_d) == 5
    same = {k: v for k, v in reference.items() if not any(k.startswith(p + ".") for p in one_d)}
    assert _equal_states(same, state) == []
    for prefix in one_d:
        assert state[f"{prefix}.exp_avg"].dtype == torch.float8_e4m3fn
        want, got = _moments(reference, prefix + "."), _moments(state, prefix + ".")
        for name in storage.MOMENT_NAMES:  # within one E4M3 step of the group maximum
            assert (got[name] - want[name]).abs().max() <= 2**-3 * want[name].abs().max()
    torch.testing.assert_close(load["losses"], run["losses"][SAVE_AT:], rtol=1e-3, atol=0)


def test_unsharded_checkpoint_loads_on_four_ranks(runs):
    """1 -> 4: FP8 moments of 1-D parameters are decoded (exactly) into the sharded run's float32 ones."""
    run, load = runs["run1_unsharded"], runs["load4"]
    reference, state = run["state"], load["state"]
    converted = 0
    for key, value in state.items():
        prefix = key.rsplit(".", 1)[0]
        if f"{prefix}.exp_avg_amax" in reference and f"{prefix}.exp_avg_amax" not in state:
            if key.endswith(".exp_avg") or key.endswith(".exp_avg_sq"):
                decoded = _moments(reference, prefix + ".")[key.rsplit(".", 1)[1]]
                assert value.dtype == torch.float32 and torch.equal(value, decoded), key
                converted += 1
        else:
            assert torch.equal(_bits(value), _bits(reference[key])), key
    assert converted == 10
    torch.testing.assert_close(load["losses"], run["losses"][SAVE_AT:], rtol=1e-3, atol=0)


def test_fsdp_training_tracks_single_process_training(runs):
    """Same init, same micro-batches: the 2-rank FSDP run and the unsharded 1-process run see the same first
    loss exactly (FP8 linears on all-gathered weights) and stay close (only the norm weights' moments differ:
    float32 when sharded, FP8 when not)."""
    sharded, single = runs["run2"]["losses"], runs["run1_unsharded"]["losses"]
    assert sharded[0] == single[0]
    torch.testing.assert_close(sharded, single, rtol=2e-3, atol=0)


def test_fused_qkv_under_fsdp_tracks_its_single_process_run(runs):
    """Recipe(fused_qkv=True) on 2 FSDP2 ranks (the stacked weight built from all-gathered q/k/v weights, its
    gradient split back and reduce-scattered): the same first loss as one unsharded process, close afterwards;
    close to, not equal to, the separate-projection run."""
    fused2, fused1 = runs["run2_fused_qkv"]["losses"], runs["run1_fused_qkv_unsharded"]["losses"]
    assert fused2[0] == fused1[0]
    torch.testing.assert_close(fused2, fused1, rtol=2e-3, atol=0)
    separate = runs["run2"]["losses"]
    assert fused2 != separate
    torch.testing.assert_close(fused2, separate, rtol=3e-2, atol=0)


def test_two_layers_per_fsdp_unit_train_exactly_like_one(runs):
    """shard_model(layers_per_unit=2): both decoder layers gathered and reduce-scattered as one FSDP unit -- the same
    sums, so the same losses and the same saved state bit for bit as one unit per layer."""
    grouped, per_layer = runs["run2_two_layers_per_unit"], runs["run2"]
    assert grouped["losses"] == per_layer["losses"]
    assert not _equal_states(grouped["state"], per_layer["state"])
