"""Bad input, atomic writes, the command line and perplexity evaluation."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import warnings

import pytest
import torch

from _export_models import tiny_llama, token_batch
from fp8train.export import evaluate, export, load, quantize_model


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- bad input ------------------------------------------------------------------------------------------------

def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'int3'.*fp8-dynamic"):
        export(tiny_llama(), tmp_path / "out", "int3")
    assert not (tmp_path / "out").exists()


def test_a_model_with_nothing_to_quantize(tmp_path):
    # hidden 96: no linear layer's input width is a multiple of 128, so w4a16 has nothing to do
    model = tiny_llama(hidden=96, intermediate=192)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="nothing to quantize for w4a16"):
        export(model, tmp_path / "out", "w4a16")
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        export(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "out", "fp8-dynamic")
    assert not (tmp_path / "out").exists()


def test_layers_not_divisible_by_the_group_size_stay_bf16_with_a_warning(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny_llama(hidden=128, intermediate=192)  # down_proj has 192 inputs: not a multiple of 128
    with pytest.warns(UserWarning) as caught:
        info = export(model, tmp_path / "out", "w4a16", method="rtn")
    messages = [str(w.message) for w in caught]
    for layer in (0, 1):
        assert f"model.layers.{layer}.mlp.down_proj: 192 input features are not a multiple of the group size 128" \
            in "\n".join(messages)
    assert "model.layers.1.mlp.down_proj" in info["skipped"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["ignore"]
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.up_proj.weight_packed" in tensors
    with _quiet():
        ct_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the reader accepts the mix
        ct_model(input_ids=token_batch(1, 8))
    assert torch.equal(ct_model.model.layers[0].mlp.down_proj.weight,
                       model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))


def test_options_that_need_calibration_or_activations(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="'gptq' needs calibration"):
        quantize_model(model, "w4a16", method="gptq")
    with pytest.raises(ValueError, match="SmoothQuant needs calibration"):
        quantize_model(model, "w8a8-int8", smoothquant=0.8)
    with pytest.raises(ValueError, match="does not quantize activations"):
        quantize_model(model, "w4a16", smoothquant=0.8, calibration=token_batch())
    with pytest.raises(ValueError, match="unknown method"):
        quantize_model(model, "fp8-dynamic", method="awq")
    with pytest.warns(UserWarning, match="no calibration data"):
        assert quantize_model(model, "w4a16").info["method"] == "rtn"


def test_simulation_only_fp4_scales_are_refused_by_export(tmp_path):
    model = tiny_llama()
    qm = quantize_model(model, "w4a8-fp", method="rtn", fp4_scales="pow2-shared-max")
    assert qm.scheme.exportable
    with pytest.raises(ValueError, match="group size 32"):
        export(model, tmp_path / "out", "w4a8-fp", group_size=64)
    assert not (tmp_path / "out").exists()


# -- atomic output ---------------------------------------------------------------------------------------------

def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = tiny_llama()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(model, out, "fp8-dynamic")
    assert (out / "keep.txt").read_text() == "mine"
    export(model, out, "fp8-dynamic", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old directories left


def test_a_failed_export_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_llama()
    out = tmp_path / "out"

    def broken_save(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export(model, out, "fp8-dynamic")
    assert list(tmp_path.iterdir()) == []
    # with --overwrite, a failure keeps the previous checkpoint intact
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export(model, out, "fp8-dynamic", overwrite=True)
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- evaluation ------------------------------------------------------------------------------------------------

def test_perplexity_matches_a_direct_computation():
    from fp8train.export.quality import perplexity

    model = tiny_llama()
    tokens = token_batch(3, 20)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), tokens[:, 1:].reshape(-1))
    result = perplexity(model, tokens, batch_size=2)
    assert result["tokens"] == 3 * 19
    assert math.isclose(result["perplexity"], math.exp(float(nll)), rel_tol=1e-5)


def test_evaluate_from_disk_equals_evaluate_in_memory(tmp_path):
    model = tiny_llama()
    tokens = token_batch(4, 32, seed=5)
    calibration = token_batch(8, 32, seed=6)
    with _quiet():
        in_memory = evaluate(model, tokens, "w4a16", calibration=calibration)
        export(model, tmp_path / "w4", "w4a16", calibration=calibration)
    from_disk = evaluate(tmp_path / "w4", tokens)
    assert in_memory["method"] == "gptq"
    assert from_disk["perplexity"] == in_memory["perplexity"]
    bf16 = evaluate(model, tokens)
    assert bf16["perplexity"] != in_memory["perplexity"]
    plain = load_plain_perplexity(model, tokens)
    assert abs(bf16["perplexity"] / plain - 1) < 1e-2  # bf16 rounding of the weights only


def load_plain_perplexity(model, tokens):
    from fp8train.export.quality import perplexity

    return perplexity(model, tokens)["perplexity"]


def test_compare_reports_every_variant():
    from fp8train.export.quality import Variant, compare, report_markdown

    model = tiny_llama()
    tokens = token_batch(2, 32)
    variants = [Variant("bf16"), Variant("fp8-dynamic", "fp8-dynamic"),
                Variant("activations only: INT8 per token", activations_only="int8", exported=False),
                Variant("needs data", "w4a16", {"method": "gptq"}, needs_calibration=True)]
    rows = compare(model, tokens, variants, progress=lambda *_: None)
    assert [r["label"] for r in rows] == ["bf16", "fp8-dynamic", "activations only: INT8 per token"]
    assert rows[0]["delta_vs_bf16"] == 0.0 and rows[1]["delta_vs_bf16"] != 0.0
    text = report_markdown(rows, command="python x.py")
    assert "| fp8-dynamic | yes |" in text and "python x.py" in text


# -- the command line ----------------------------------------------------------------------------------------

@pytest.fixture()
def model_dir(tmp_path):
    model = tiny_llama(vocab=256)
    path = tmp_path / "model"
    model.save_pretrained(path)
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 60)
    return path, text


def test_cli_export_and_eval(model_dir, tmp_path, capsys):
    from fp8train.cli import main

    path, text = model_dir
    out = tmp_path / "w4"
    with _quiet():
        assert main(["export", str(path), "--format", "w4a16", "--out", str(out), "--calibration-data", str(text),
                     "--calibration-samples", "4", "--calibration-seq-len", "64", "--eval-data", str(text),
                     "--seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "14 layers quantized" in printed and "(gptq)" in printed and "perplexity: bf16" in printed
    info = json.loads((out / "fp8train_export.json").read_text())
    assert info["calibration"] == {"samples": 4, "tokens": 256}
    capsys.readouterr()
    assert main(["export", str(path), "--format", "fp8-dynamic", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err and "--overwrite" in err
    with _quiet():
        assert main(["eval", str(out), "--data", str(text), "--seq-len", "64"]) == 0
    assert "checkpoint: perplexity" in capsys.readouterr().out
    report = tmp_path / "report.md"
    with _quiet():
        assert main(["eval", str(path), "--data", str(text), "--seq-len", "64", "--formats", "fp8-dynamic,w8a8-int8",
                     "--report-out", str(report), "--json-out", str(tmp_path / "r.json")]) == 0
    assert "| w8a8-int8 | yes |" in report.read_text() and "FP8 vs INT8" in report.read_text()
    assert len(json.loads((tmp_path / "r.json").read_text())) == 3


def test_cli_rejects_unknown_formats_and_quantized_sources(model_dir, tmp_path, capsys):
    from fp8train.cli import main

    path, text = model_dir
    with pytest.raises(SystemExit) as exc:
        main(["export", str(path), "--format", "int3", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    export(load_model(path), tmp_path / "fp8", "fp8-dynamic")
    assert main(["export", str(tmp_path / "fp8"), "--format", "w4a16", "--out", str(tmp_path / "y")]) == 1
    assert "error:" in (err := capsys.readouterr().err) and "already quantized" in err
    assert main(["eval", str(path), "--data", str(text), "--formats", "int3"]) == 1
    assert "unknown format(s) ['int3']" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--format", "w4a16", "--out", str(tmp_path / "y")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_run_directory_picks_the_model_inside(model_dir, tmp_path):
    from fp8train.export.io import find_model_dir

    path, _ = model_dir
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "final")
    assert find_model_dir(run) == run / "final"
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        find_model_dir(tmp_path / "run" / "checkpoints")
    assert isinstance(load(run / "final"), torch.nn.Module)  # a plain model directory loads as bf16 values


# -- fp8train train run directories --------------------------------------------------------------------------

def _fake_run(tmp_path, train_settings=None):
    """A run directory in the layout of ``fp8train train``: config.json, tokenizer.json, checkpoints/step_*/."""
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    run = tmp_path / "run"
    model = tiny_llama(vocab=300)
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    save_model(model, str(step / "model.safetensors"))
    size = (step / "model.safetensors").stat().st_size
    (step / "manifest.json").write_text(json.dumps({"format": 1, "step": 10,
                                                    "files": {"model.safetensors": size}}))
    damaged = run / "checkpoints" / "step_00000020"  # killed mid-save: no manifest
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"partial")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(run / "tokenizer.json"))
    settings = {"seq_len": 32, "vocab_size": 300, **(train_settings or {})}
    (run / "config.json").write_text(json.dumps({"train": settings, "model": model.config.to_dict(),
                                                 "parameters": 1}))
    return run, model


def test_export_from_a_run_directory_uses_its_newest_complete_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    from fp8train.export.io import open_source

    run, model = _fake_run(tmp_path)
    with pytest.warns(UserWarning, match="step_00000020"):
        source = open_source(run)
    assert source.kind == "run" and source.weights.parent.name == "step_00000010"
    loaded = source.load_model()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with _quiet():
        info = export(run, tmp_path / "out", "fp8-dynamic")
    assert info["source"]["kind"] == "run"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # tokenizer.json + a generated tokenizer_config
    assert tokenizer.decode(tokenizer("def f(x):")["input_ids"]) == "def f(x):"
    with pytest.raises(FileNotFoundError, match="without a complete checkpoint"):
        (run / "checkpoints" / "step_00000010" / "manifest.json").unlink()
        with _quiet():
            open_source(run)


def test_run_directory_corpus_gives_calibration_and_eval_tokens(tmp_path, capsys):
    pytest.importorskip("fp8train.train.data")
    from fp8train.cli import main

    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(40):
        (data / f"m{i}.py").write_text(f"def f{i}(a, b):\n    return a * {i} + b\n" * 20)
    run, _ = _fake_run(tmp_path, {"data": str(data), "text_field": "text", "eval_fraction": 0.2,
                                  "tokenizer_train_bytes": 100000, "cache_dir": str(tmp_path / "cache")})
    with _quiet():
        assert main(["export", str(run), "--format", "w4a16", "--out", str(tmp_path / "w4"),
                     "--calibration-samples", "4"]) == 0
        info = json.loads((tmp_path / "w4" / "fp8train_export.json").read_text())
        assert info["method"] == "gptq" and info["calibration"] == {"samples": 4, "tokens": 4 * 32}
        assert main(["eval", str(tmp_path / "w4"), "--max-windows", "4"]) == 0  # the run's eval split
    assert "checkpoint: perplexity" in capsys.readouterr().out


def test_kl_against_a_reference_and_token_windows():
    from fp8train.export.io import token_windows
    from fp8train.export.quality import perplexity

    model = tiny_llama()
    tokens = token_batch(4, 16)
    base = perplexity(model, tokens, batch_size=3, keep_log_probs=True)
    same = perplexity(model, tokens, batch_size=3, reference=base["log_probs"])
    assert same["kl_vs_reference"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    other = perplexity(model, tokens, batch_size=3, reference=base["log_probs"])
    assert other["kl_vs_reference"] > 1e-4 and other["top1_agreement"] < 1.0
    ids = torch.arange(100)
    assert torch.equal(token_windows(ids, 10)[3], torch.arange(30, 40))
    spread = token_windows(ids, 10, 3)
    assert torch.equal(spread[:, 0], torch.tensor([0, 40, 90]))  # evenly spread (4.5 rounds to even)
    random = token_windows(ids, 10, 5, seed=0)
    assert random.shape == (5, 10) and torch.equal(random, token_windows(ids, 10, 5, seed=0))
