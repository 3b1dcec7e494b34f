"""fp8train sweep: divergence rule, cell bookkeeping and resume (with a fake launcher), one real interrupted sweep."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from fp8train.lab import sweep
from fp8train.lab.report import stability_table
from fp8train.lab.sweep import Cell, SweepError, SweepSettings, Thresholds, cell_argv, detect_divergence, run_sweep

from train_fixtures import write_corpus

ROOT = pathlib.Path(__file__).resolve().parent.parent


def records(losses, start=1):
    return [{"step": start + i, "loss": v} for i, v in enumerate(losses)]


# -- the divergence rule ---------------------------------------------------------------------------------------

def test_divergence_rule():
    t = Thresholds(spike_factor=1.5, window=1)
    assert detect_divergence(records([6.0, 5.0, 4.0, 5.9, 3.0]), t) is None  # 5.9 < 1.5 x 4
    step, reason = detect_divergence(records([6.0, 5.0, 4.0, 6.1, 3.0]), t)
    assert step == 4 and "running min 4.000" in reason
    step, reason = detect_divergence(records([6.0, math.nan, 4.0]), t)
    assert step == 2 and "nan" in reason
    assert detect_divergence(records([6.0, 7.0]), Thresholds(loss_cap=6.5, window=1))[0] == 2
    assert detect_divergence([{"step": 3, "loss": 2.0, "eval_loss": math.inf}], t)[0] == 3
    assert detect_divergence(records([6.0, 8.5]), t) is None  # 8.5 < 1.5 x 6: the start is the running min
    # the default rule looks at the 10-step moving mean: one noisy batch is not a divergence, a lasting rise is
    noisy = [4.0] * 20 + [6.5] + [4.0] * 10
    assert detect_divergence(records(noisy), t)[0] == 21
    assert detect_divergence(records(noisy), Thresholds()) is None
    step, reason = detect_divergence(records([4.0] * 20 + [8.0] * 10), Thresholds())
    # step 25: (5 x 4 + 5 x 8) / 10 = 6.0 is not above 1.5 x 4; step 26: (4 x 4 + 6 x 8) / 10 = 6.4 is
    assert step == 26 and "10-step mean loss 6.400 > 1.5 x its running min 4.000" in reason


# -- bookkeeping with a fake launcher ----------------------------------------------------------------------------

class FakeRun:
    """Stands in for `fp8train train`: writes the files a finished (or diverged) run leaves, instantly."""

    def __init__(self, argv, scenario):
        self.argv = argv
        out = pathlib.Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        lr, seed = float(argv[argv.index("--lr") + 1]), int(argv[argv.index("--seed") + 1])
        fmt = argv[argv.index("--simulate-format") + 1].split(",")[0][2:] if "--simulate-format" in argv else \
            argv[argv.index("--recipe") + 1]
        kind = scenario(fmt, lr, seed)
        losses = {"nan": [6.0, 5.0, 4.5, 4.2], "spike": [6.0, 5.0, 4.0] + [3.0] * 7 + [12.0] * 3 + [3.5]}.get(kind, [6.0, 5.0, 4.0, 3.5, 3.2])
        lines = [{"step": i + 1, "loss": v, "sharpness": 0.1 * (i + 1)} for i, v in enumerate(losses)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if kind == "nan":
            (out / "failure.json").write_text(json.dumps({"status": "failed", "error": "the loss became nan",
                                                          "step": 4, "diverged": True, "diverged_at_step": 5}))
        elif kind == "crash":
            (out / "failure.json").write_text(json.dumps({"status": "failed", "error": "boom", "step": 2}))
        else:
            (out / "summary.json").write_text(json.dumps({"status": "complete", "final_eval_loss": losses[-1] + 0.1,
                                                          "wall_time_s": 1.0}))

    def poll(self):
        return 0

    def send_signal(self, sig):
        pass


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(sweep, "_prepare_corpus_once", lambda settings, log: None)
    calls = []

    def make(scenario):
        def launch(argv, env, log_path, append):
            calls.append(argv)
            return FakeRun(argv, scenario)
        return launch

    return calls, make


def scenario(fmt, lr, seed):
    if fmt == "e2m1" and lr == 0.1:
        return "nan" if seed == 0 else "spike"
    return "ok"


def test_grid_outcomes_report_and_resume(tmp_path, fake):
    calls, make = fake
    settings = SweepSettings(steps=5)
    out = tmp_path / "sw"
    result = run_sweep(["bf16", "e2m1"], [0.01, 0.1], 2, settings, str(out), launch=make(scenario), log=lambda m: None)
    assert len(calls) == 8 and not result["interrupted"]
    by_name = {r["name"]: r for r in result["results"]}
    nan, spike = by_name["e2m1_lr0.1_seed0"], by_name["e2m1_lr0.1_seed1"]
    assert (nan["stable"], nan["divergence_step"]) == (False, 5) and "non-finite" in nan["reason"]
    # the 10-step mean reaches its minimum 3.6 at step 10; at step 13 it is (7 x 3 + 3 x 12) / 10 = 5.7 > 1.5 x 3.6
    assert (spike["stable"], spike["divergence_step"]) == (False, 13) and spike["final_eval_loss"] == pytest.approx(3.6)
    assert by_name["bf16_lr0.1_seed1"]["stable"] and by_name["bf16_lr0.1_seed1"]["final_sharpness"] == pytest.approx(0.5)
    table = stability_table(["bf16", "e2m1"], [0.01, 0.1], result["results"])
    assert table["e2m1", 0.1]["fraction"] == 0.0 and table["e2m1", 0.01]["fraction"] == 1.0
    assert table["bf16", 0.1]["eval_loss"] == pytest.approx(3.3)
    # what each cell ran: the control as a recipe, the format on all three operands
    bf16 = next(a for a in calls if "bf16_lr0.01_seed0" in a[a.index("--out") + 1])
    e2m1 = next(a for a in calls if "e2m1_lr0.1_seed1" in a[a.index("--out") + 1])
    assert "--simulate-format" not in bf16 and bf16[bf16.index("--recipe") + 1] == "bf16"
    assert e2m1[e2m1.index("--simulate-format") + 1] == "a=e2m1,w=e2m1,g=e2m1"
    assert e2m1[e2m1.index("--lr") + 1] == "0.1" and e2m1[e2m1.index("--seed") + 1] == "1" and "--overwrite" in e2m1
    # the report and its files
    saved = json.loads((out / "results.json").read_text())
    assert saved["stable_fraction"]["e2m1@0.1"] == 0.0 and len(saved["cells"]) == 8
    report = (out / "report.md").read_text()
    assert "| e2m1 | 2/2: " in report and "diverged at step 5: non-finite" in report
    import matplotlib.image

    for png in ("heatmap.png", "loss_curves.png", "sharpness.png"):
        assert matplotlib.image.imread(out / png).ndim == 3

    # run again: nothing left to do
    calls.clear()
    run_sweep(["bf16", "e2m1"], [0.01, 0.1], 2, settings, str(out), launch=make(scenario), log=lambda m: None)
    assert calls == []
    # a lost summary, a crashed cell and an interrupted cell with a checkpoint are run again; only the latter resumes
    (out / "runs" / "bf16_lr0.01_seed0" / "summary.json").unlink()
    crashed = out / "runs" / "bf16_lr0.01_seed1"
    (crashed / "summary.json").unlink()
    (crashed / "failure.json").write_text(json.dumps({"status": "failed", "error": "boom", "step": 2}))
    stopped = out / "runs" / "e2m1_lr0.01_seed0"
    (stopped / "summary.json").unlink()
    (stopped / "failure.json").write_text(json.dumps({"status": "interrupted", "error": "SIGINT", "step": 2}))
    (stopped / "config.json").write_text("{}")
    (stopped / "checkpoints" / "step_00000002").mkdir(parents=True)
    (stopped / "checkpoints" / "step_00000002" / "manifest.json").write_text(json.dumps({"files": {}}))
    states = {r["name"]: r["state"] for r in run_sweep(["bf16", "e2m1"], [0.01, 0.1], 2, settings, str(out),
                                                        report_only=True, log=lambda m: None)["results"]}
    assert (states["bf16_lr0.01_seed0"], states["bf16_lr0.01_seed1"], states["e2m1_lr0.01_seed0"]) == \
        ("interrupted", "failed", "interrupted")
    run_sweep(["bf16", "e2m1"], [0.01, 0.1], 2, settings, str(out), launch=make(scenario), log=lambda m: None)
    ran = {pathlib.Path(a[a.index("--out") + 1]).name: a for a in calls}
    assert set(ran) == {"bf16_lr0.01_seed0", "bf16_lr0.01_seed1", "e2m1_lr0.01_seed0"}
    assert "--resume" in ran["e2m1_lr0.01_seed0"] and "--overwrite" in ran["bf16_lr0.01_seed1"]


def test_changed_settings_need_a_new_directory(tmp_path, fake):
    calls, make = fake
    out = str(tmp_path / "sw")
    run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=5), out, launch=make(scenario), log=lambda m: None)
    with pytest.raises(SweepError, match="other training settings \\(steps\\)"):
        run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=6), out, launch=make(scenario), log=lambda m: None)
    calls.clear()
    run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=6), out, overwrite=True, launch=make(scenario),
              log=lambda m: None)
    assert len(calls) == 1
    # a sweep.json written before a setting existed still matches (the new setting takes its default)
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    del saved["settings"]["include_lm_head"]
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(saved))
    run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=6), out, report_only=True, log=lambda m: None)
    # --report-only keeps the command that trained the runs in the report
    run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=6), out, command="fp8train sweep --first", launch=make(scenario),
              log=lambda m: None)
    run_sweep(["bf16"], [0.01], 1, SweepSettings(steps=6), out, report_only=True, command="fp8train sweep --again",
              log=lambda m: None)
    assert "fp8train sweep --first" in (tmp_path / "sw" / "report.md").read_text()
    # a wider grid with the same settings only runs the new cells
    calls.clear()
    run_sweep(["bf16", "e4m3"], [0.01], 1, SweepSettings(steps=6), out, launch=make(scenario), log=lambda m: None)
    assert [pathlib.Path(a[a.index("--out") + 1]).name for a in calls] == ["e4m3_lr0.01_seed0"]


def test_bad_grids_are_refused_before_running(tmp_path):
    s = SweepSettings()
    for formats, lrs, message in ((["e4m3", "e4m3"], [0.1], "repeat"), (["e9m9x"], [0.1], "unknown number format"),
                                  (["int8"], [0.1], None), (["e4m3"], [-1.0], "positive")):
        if message is None:
            with pytest.raises(SweepError, match="integer formats need a scale"):
                run_sweep(formats, lrs, 1, SweepSettings(scaling="none"), str(tmp_path / "x"))
            continue
        with pytest.raises(SweepError, match=message):
            run_sweep(formats, lrs, 1, s, str(tmp_path / "x"))
    with pytest.raises(SweepError, match="--operands"):
        run_sweep(["e4m3"], [0.1], 1, SweepSettings(operands="weights,bias"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_operands_and_gradient_format():
    s = SweepSettings(operands="activations,gradients", grad_format="e5m2", scaling="none")
    argv = cell_argv(Cell("e3m4", 0.01, 3), s, pathlib.Path("r"), resume=True)
    assert argv[argv.index("--simulate-format") + 1] == "a=e3m4,w=none,g=e5m2" and "--simulate-lm-head" not in argv
    assert "--simulate-lm-head" in cell_argv(Cell("e3m4", 0.01, 3), SweepSettings(include_lm_head=True),
                                             pathlib.Path("r"), resume=False)
    assert "--simulate-lm-head" not in cell_argv(Cell("bf16", 0.01, 3), SweepSettings(include_lm_head=True),
                                                 pathlib.Path("r"), resume=False)
    assert argv[argv.index("--simulate-scaling") + 1] == "none" and argv[-1] == "--resume"


# -- the real thing: interrupt a sweep, continue it --------------------------------------------------------------

def test_interrupted_sweep_resumes_and_finishes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "fp8train", "sweep", "--formats", "e3m4", "--lrs", "3e-3", "--seeds", "1",
           "--steps", "40", "--out", str(out), "--model", "micro", "--vocab-size", "300", "--batch-size", "2",
           "--seq-len", "16", "--eval-batches", "1", "--eval-every", "20", "--sharpness-every", "10",
           "--data", str(corpus), "--cache-dir", str(tmp_path / "c"), "--tokenizer-train-bytes", "20000",
           "--train-args", "--checkpoint-every 0", "--spike-factor", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = [out / "runs" / "e3m4_lr0.003_seed0" / "metrics.jsonl"]
    deadline = time.time() + 240
    while not all(m.exists() and len(m.read_text().splitlines()) >= 2 for m in metrics):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    for m in metrics:
        failure = json.loads((m.parent / "failure.json").read_text())
        assert failure["status"] == "interrupted" and (m.parent / "checkpoints").is_dir()
    assert "not finished" in (out / "report.md").read_text()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 already done, 1 to run" in done.stdout
    results = json.loads((out / "results.json").read_text())["cells"]
    assert all(r["state"] == "complete" and r["stable"] for r in results)
    for m in metrics:
        assert "resumed from" in (out / "logs" / f"{m.parent.name}.log").read_text()
        lines = [json.loads(x) for x in m.read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, 41))
        assert [r["step"] for r in lines if "sharpness" in r] == [10, 20, 30, 40]


def test_lab_imports_stay_cheap():
    code = ("import sys, fp8train.lab, fp8train.lab.sweep, fp8train.lab.report, fp8train.cli; "
            "fp8train.cli.build_parser(); print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == "[]"
