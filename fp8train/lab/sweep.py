"""``fp8train sweep``: formats x learning rates x seeds of short trainings, and which of them stayed stable.

    fp8train sweep --formats bf16,e4m3,e3m4,e5m2 --seeds 2 --lrs 1e-3,1e-2 --steps 300 --out runs/sweep

Each grid cell is one ``fp8train train`` run (a subprocess, ``<out>/runs/<cell>/``) with the cell's format,
learning rate and seed and everything else shared.  A format entry is either a simulated format applied to the
GEMM inputs of every linear (``--simulate-format``: activations, weights and gradients, or the operands named
by ``--operands``; ``--grad-format`` overrides the gradients' format) or one of the recipes ``bf16``, ``fp8``,
``coat`` run as they are (the controls).  Cells run ``--jobs`` at a time (default: one per CPU core, each with
cores/jobs threads).

Bookkeeping (:func:`cell_result`): a cell is *diverged* when its training loss became NaN/inf (the run stops
there), or when the moving mean of its training loss over ``--spike-window`` (10) steps rose above
``--spike-factor`` (1.5) times its running minimum, or above ``--loss-cap``, at any step; else *stable*.  Final eval loss and last-token sharpness (:mod:`fp8train.lab.sharpness`) come from the run's
``summary.json`` and ``metrics.jsonl``.

Resume: run the same command again.  Finished cells (a summary, or a NaN divergence) are skipped; interrupted
ones continue from their last checkpoint; failed ones are retried.  Ctrl-C / SIGTERM stops the running cells at a
step boundary with a checkpoint, writes the report of what is done and exits with status 130.  The divergence
rule is applied when the report is written, so ``--report-only`` with another ``--spike-factor`` re-judges the
runs without training.

Outputs in ``--out``: ``sweep.json`` (settings), ``results.json`` (one record per cell), ``report.md``,
``heatmap.png`` (format x learning rate: fraction of seeds that stayed stable), ``loss_curves.png``,
``sharpness.png``, ``logs/<cell>.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

CONTROL_RECIPES = ("bf16", "fp8", "coat")
OPERANDS = ("activations", "weights", "gradients")
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


class SweepError(Exception):
    """A problem with the sweep's settings or output directory that the user can fix."""


@dataclasses.dataclass
class SweepSettings:
    """What every cell shares (``sweep.json``); changing any of these needs a new --out (or --overwrite)."""

    steps: int = 300
    model: str = "micro"
    batch_size: int = 16
    seq_len: int = 128
    vocab_size: Optional[int] = None
    warmup_steps: Optional[int] = None
    schedule: str = "cosine"
    eval_every: Optional[int] = None
    eval_batches: int = 4
    sharpness_every: Optional[int] = None  # None: steps / 20
    sharpness_eps: float = 1e-3
    scaling: str = "tensor"
    operands: str = "activations,weights,gradients"
    grad_format: Optional[str] = None
    include_lm_head: bool = False
    data: Optional[str] = None
    cache_dir: Optional[str] = None
    tokenizer_train_bytes: Optional[int] = None
    device: str = "cpu"
    train_args: str = ""  # extra `fp8train train` flags for every cell

    def resolved_sharpness_every(self) -> int:
        return self.sharpness_every if self.sharpness_every is not None else max(1, self.steps // 20)


@dataclasses.dataclass
class Thresholds:
    """The divergence rule (applied when reading results, so it can change without retraining).

    The rule looks at the moving mean of the training loss over ``window`` steps (a single small batch is
    noisy; a divergence lasts): diverged when it exceeds ``spike_factor`` x its running minimum or ``loss_cap``,
    or when any loss is NaN/inf.
    """

    spike_factor: float = 1.5
    loss_cap: Optional[float] = None
    window: int = 10


@dataclasses.dataclass(frozen=True)
class Cell:
    format: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.format}_lr{self.lr:g}_seed{self.seed}"


def make_grid(formats: list[str], lrs: list[float], seeds: int, first_seed: int = 0) -> list[Cell]:
    return [Cell(f, lr, first_seed + s) for f in formats for lr in lrs for s in range(seeds)]


# -- what a cell runs --------------------------------------------------------------------------------------------

def simulate_spec(fmt: str, settings: SweepSettings) -> Optional[str]:
    """The --simulate-format spec of a format entry (None for the recipe controls)."""
    if fmt in CONTROL_RECIPES:
        return None
    chosen = [op.strip() for op in settings.operands.split(",") if op.strip()]
    spec = {op: (fmt if op in chosen else "none") for op in OPERANDS}
    if settings.grad_format is not None and "gradients" in chosen:
        spec["gradients"] = settings.grad_format
    return ",".join(f"{op[0]}={spec[op]}" for op in OPERANDS)


def cell_argv(cell: Cell, settings: SweepSettings, run_dir: pathlib.Path, resume: bool) -> list[str]:
    """The ``fp8train train`` command line of one cell."""
    s = settings
    argv = [sys.executable, "-m", "fp8train", "train", "--out", str(run_dir), "--no-progress",
            "--steps", str(s.steps), "--model", s.model, "--batch-size", str(s.batch_size), "--seq-len", str(s.seq_len),
            "--lr", repr(cell.lr), "--seed", str(cell.seed), "--schedule", s.schedule, "--eval-batches", str(s.eval_batches),
            "--sharpness-every", str(s.resolved_sharpness_every()), "--sharpness-eps", repr(s.sharpness_eps),
            "--device", s.device, "--keep-checkpoints", "1"]
    optional = {"--vocab-size": s.vocab_size, "--warmup-steps": s.warmup_steps, "--eval-every": s.eval_every,
                "--data": s.data, "--cache-dir": s.cache_dir, "--tokenizer-train-bytes": s.tokenizer_train_bytes}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    spec = simulate_spec(cell.format, s)
    if spec is None:
        argv += ["--recipe", cell.format]
    else:
        argv += ["--recipe", "bf16", "--simulate-format", spec, "--simulate-scaling", s.scaling]
        if s.include_lm_head:
            argv += ["--simulate-lm-head"]
    argv += shlex.split(s.train_args)
    argv += ["--resume"] if resume else ["--overwrite"]
    return argv


def check_settings(formats: list[str], lrs: list[float], seeds: int, settings: SweepSettings) -> None:
    """Refuse impossible grids before anything runs."""
    from .simulated_linear import SimulatedFormats

    if not formats or not lrs:
        raise SweepError("--formats and --lrs need at least one entry each")
    if seeds < 1:
        raise SweepError(f"--seeds must be at least 1, got {seeds}")
    if len(set(formats)) != len(formats) or len(set(lrs)) != len(lrs):
        raise SweepError("--formats and --lrs must not repeat an entry")
    if any(lr <= 0 or not math.isfinite(lr) for lr in lrs):
        raise SweepError(f"learning rates must be positive, got {lrs}")
    if settings.steps < 2:
        raise SweepError(f"--steps must be at least 2, got {settings.steps}")
    unknown_ops = [op for op in settings.operands.split(",") if op.strip() and op.strip() not in OPERANDS]
    if unknown_ops:
        raise SweepError(f"--operands: unknown {unknown_ops}; use a comma-separated subset of {', '.join(OPERANDS)}")
    for fmt in formats:
        if "," in fmt or "=" in fmt:
            raise SweepError(f"format entry {fmt!r}: give plain format names (e4m3, e2m1, e7m7b127, bf16); "
                             "choose operands with --operands and the gradient format with --grad-format")
        spec = simulate_spec(fmt, settings)
        if spec is not None:
            try:
                SimulatedFormats.parse(spec, settings.scaling)
            except ValueError as exc:
                raise SweepError(f"format {fmt!r}: {exc}") from None


# -- reading a cell's outcome ------------------------------------------------------------------------------------

def _read_json(path: pathlib.Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(path: pathlib.Path) -> list[dict]:
    from ..train.metrics import MetricsLog

    return MetricsLog(path).read()


def detect_divergence(records: list[dict], thresholds: Thresholds) -> Optional[tuple[int, str]]:
    """(step, reason) of the first step where a loss is non-finite, or where the moving mean of the training
    loss (over ``thresholds.window`` steps) is above the cap or above ``spike_factor`` x its running minimum
    before that step; None when there is none."""
    running_min = math.inf
    recent: list[float] = []
    what = "loss" if thresholds.window <= 1 else f"{thresholds.window}-step mean loss"
    for record in sorted(records, key=lambda r: r.get("step", 0)):
        step = record.get("step", 0)
        for key in ("loss", "eval_loss"):
            value = record.get(key)
            if value is not None and not math.isfinite(value):
                return step, f"{'training' if key == 'loss' else 'eval'} loss {value}"
        if record.get("loss") is None:
            continue
        recent = (recent + [record["loss"]])[-max(1, thresholds.window):]
        mean = sum(recent) / len(recent)
        if thresholds.loss_cap is not None and mean > thresholds.loss_cap:
            return step, f"{what} {mean:.3f} > cap {thresholds.loss_cap:g}"
        if mean > thresholds.spike_factor * running_min:
            return step, f"{what} {mean:.3f} > {thresholds.spike_factor:g} x its running min {running_min:.3f}"
        running_min = min(running_min, mean)
    return None


def cell_result(cell: Cell, run_dir: pathlib.Path, thresholds: Thresholds) -> dict:
    """One cell's outcome.  ``state``: complete | pending | interrupted | failed; for complete cells ``stable``
    (bool), ``reason`` and ``divergence_step`` of a divergence, final eval loss, sharpness, wall time."""
    result = {"format": cell.format, "lr": cell.lr, "seed": cell.seed, "name": cell.name, "state": "pending",
              "stable": None, "reason": None, "divergence_step": None, "final_eval_loss": None,
              "final_train_loss": None, "final_sharpness": None, "max_sharpness": None, "steps_done": 0,
              "wall_time_s": None, "error": None}
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    sharp = [r["sharpness"] for r in records if r.get("sharpness") is not None]
    result["steps_done"] = records[-1]["step"] if records else 0
    result["final_train_loss"] = losses[-1] if losses else None
    result["final_sharpness"] = sharp[-1] if sharp else None
    finite_sharp = [s for s in sharp if math.isfinite(s)]
    result["max_sharpness"] = max(finite_sharp) if finite_sharp else None
    summary = _read_json(run_dir / "summary.json")
    failure = _read_json(run_dir / "failure.json")
    if summary is not None and summary.get("status") == "complete":
        result["state"] = "complete"
        result["final_eval_loss"] = summary.get("final_eval_loss")
        result["wall_time_s"] = summary.get("wall_time_s")
    elif failure is not None and failure.get("diverged"):
        result["state"] = "complete"
        step = failure.get("diverged_at_step", result["steps_done"] + 1)
        result.update(stable=False, divergence_step=step, reason=f"non-finite training loss at step {step}")
        return result
    elif failure is not None and failure.get("status") == "failed":
        result.update(state="failed", error=failure.get("error"))
        return result
    elif failure is not None or records or (run_dir / "checkpoints").exists():
        result["state"] = "interrupted"
        return result
    else:
        return result
    found = detect_divergence(records, thresholds)
    if found is None and result["final_eval_loss"] is not None and not math.isfinite(result["final_eval_loss"]):
        found = (result["steps_done"], f"final eval loss {result['final_eval_loss']}")
    if found is None:
        result["stable"] = True
    else:
        result.update(stable=False, divergence_step=found[0], reason=found[1])
    return result


def needs_run(result: dict) -> bool:
    return result["state"] in ("pending", "interrupted", "failed")


def can_resume(run_dir: pathlib.Path) -> bool:
    from ..train.checkpoint import latest_checkpoint

    return (run_dir / "config.json").is_file() and latest_checkpoint(run_dir / "checkpoints") is not None


# -- running the grid --------------------------------------------------------------------------------------------

def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def launch_process(argv: list[str], env: dict, log_path: pathlib.Path, append: bool):
    """Start one cell (its own session, so a terminal Ctrl-C reaches only the sweep, which forwards one SIGINT)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a" if append else "w") as log_file:
        log_file.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        log_file.flush()
        return subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class _Interrupt(Exception):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupt(signal.Signals(signum).name)


def run_sweep(formats: list[str], lrs: list[float], seeds: int, settings: SweepSettings, out: str,
              thresholds: Optional[Thresholds] = None, jobs: Optional[int] = None, overwrite: bool = False,
              first_seed: int = 0, report_only: bool = False, command: Optional[str] = None,
              log: Callable[[str], None] = print, launch: Callable = launch_process) -> dict:
    """Run (or continue) the grid and write the report; returns {"results", "interrupted", "report"}."""
    from ..train.checkpoint import write_json_atomic
    from .report import write_report

    thresholds = thresholds or Thresholds()
    check_settings(formats, lrs, seeds, settings)
    root = pathlib.Path(out)
    saved = _read_json(root / "sweep.json")
    # settings added in later versions take their defaults, so older sweeps stay resumable
    saved_settings = {**dataclasses.asdict(SweepSettings()), **saved["settings"]} if saved else None
    if saved is not None and saved_settings != dataclasses.asdict(settings):
        if not overwrite:
            changed = sorted(k for k, v in dataclasses.asdict(settings).items() if saved_settings.get(k) != v)
            raise SweepError(f"{root} holds a sweep with other training settings ({', '.join(changed)}); rerun with "
                             "the same settings to continue it, choose another --out, or pass --overwrite")
    if overwrite and not report_only:
        import shutil

        for name in ("runs", "logs"):
            shutil.rmtree(root / name, ignore_errors=True)
    grid = make_grid(formats, lrs, seeds, first_seed)
    if report_only and saved is not None and saved.get("command"):
        command = saved["command"]  # the report shows the command that trained the runs
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "sweep.json", {"settings": dataclasses.asdict(settings), "formats": formats,
                                            "lrs": lrs, "seeds": seeds, "first_seed": first_seed,
                                            "command": command})
    run_dirs = {cell: root / "runs" / cell.name for cell in grid}
    todo = [cell for cell in grid if needs_run(cell_result(cell, run_dirs[cell], thresholds))]
    interrupted = False
    if todo and not report_only:
        done_before = len(grid) - len(todo)
        log(f"sweep: {len(grid)} cells ({len(formats)} formats x {len(lrs)} lrs x {seeds} seeds), "
            f"{done_before} already done, {len(todo)} to run")
        _prepare_corpus_once(settings, log)
        interrupted = _run_cells(todo, run_dirs, settings, root, thresholds, jobs, log, launch)
    results = [cell_result(cell, run_dirs[cell], thresholds) for cell in grid]
    report = write_report(root, settings, thresholds, formats, lrs, results, command=command)
    log(f"report: {report}")
    return {"results": results, "interrupted": interrupted, "report": report}


def _prepare_corpus_once(settings: SweepSettings, log) -> None:
    """Tokenize (or find the cached tokens) in this process, so that parallel cells only read the cache."""
    from ..train.config import TrainConfig, TrainError, resolve
    from ..train.data import prepare_corpus

    overrides = {k: v for k, v in dict(vocab_size=settings.vocab_size, data=settings.data, cache_dir=settings.cache_dir,
                                       tokenizer_train_bytes=settings.tokenizer_train_bytes).items() if v is not None}
    try:
        c = resolve(TrainConfig(model=settings.model, steps=settings.steps, seq_len=settings.seq_len,
                                out=os.devnull, **overrides))
        prepare_corpus(c.data, c.text_field, c.vocab_size, c.eval_fraction, c.tokenizer_train_bytes, c.cache_dir,
                       log=log)
    except TrainError as exc:
        raise SweepError(str(exc)) from None


def _run_cells(todo: list[Cell], run_dirs: dict, settings: SweepSettings, root: pathlib.Path,
               thresholds: Thresholds, jobs: Optional[int], log, launch) -> bool:
    """Run ``todo`` with at most ``jobs`` processes at a time; True when interrupted."""
    cores = available_cores()
    if jobs is None and settings.device != "cpu":
        jobs = 1  # runs on one GPU would compete for its memory; --jobs N asks for more
    jobs = max(1, min(jobs or cores, len(todo)))
    env = _child_env(max(1, cores // jobs))
    log(f"sweep: {jobs} parallel run(s), {env['OMP_NUM_THREADS']} thread(s) each; logs in {root / 'logs'}")
    queue = list(todo)
    running: dict = {}  # cell -> (process, start time)
    finished = 0
    stopping = False
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            try:
                while queue and len(running) < jobs and not stopping:
                    cell = queue.pop(0)
                    resume = can_resume(run_dirs[cell])
                    argv = cell_argv(cell, settings, run_dirs[cell], resume)
                    running[cell] = (launch(argv, env, root / "logs" / f"{cell.name}.log", resume), time.time())
                for cell, (proc, started) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[cell]
                    finished += 1
                    r = cell_result(cell, run_dirs[cell], thresholds)
                    log(f"[{finished}/{len(todo)}] {cell.name}: {_describe(r, code)} ({time.time() - started:.0f} s)")
                time.sleep(0.2)
            except (KeyboardInterrupt, _Interrupt):
                if stopping:
                    raise
                stopping = True
                log(f"sweep: stopping -- {len(running)} running cell(s) save a checkpoint and stop; "
                    "run the same command again to continue")
                for proc, _ in running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return stopping


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _describe(result: dict, code: int) -> str:
    if result["state"] != "complete":
        detail = f": {result['error']}" if result.get("error") else ""
        return f"{result['state']} (exit {code}){detail}"
    if result["stable"]:
        return f"stable, eval loss {result['final_eval_loss']:.4f}"
    return f"diverged at step {result['divergence_step']} ({result['reason']})"


# -- command line --------------------------------------------------------------------------------------------

def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip().lower() for v in text.split(",") if v.strip()]


def _sweep_command(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(SweepSettings)}
    settings = SweepSettings(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    thresholds = Thresholds(spike_factor=args.spike_factor, loss_cap=args.loss_cap, window=args.spike_window)
    command = "fp8train " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["sweep"] else None
    try:
        result = run_sweep(args.formats, args.lrs, args.seeds, settings, args.out, thresholds, jobs=args.jobs,
                           overwrite=args.overwrite, first_seed=args.first_seed, report_only=args.report_only,
                           command=command)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result["interrupted"]:
        return 130
    failed = [r["name"] for r in result["results"] if r["state"] != "complete"]
    if failed and not args.report_only:
        print(f"error: {len(failed)} cell(s) did not finish (failed, not diverged -- see {args.out}/logs/): "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``fp8train sweep``."""
    d = SweepSettings()
    p = subparsers.add_parser(
        "sweep", help="stability lab: train formats x learning rates x seeds, report which stayed stable",
        description="Run a grid of short trainings (one `fp8train train` per format, learning rate and seed), "
                    "detect divergence, and write report.md with a stability heat-map, loss and sharpness curves. "
                    "Run the same command again to continue an interrupted sweep. See docs/lab.md.")
    p.add_argument("--formats", type=_names, required=True,
                   help="comma-separated: simulated formats (e4m3, e3m4, e5m2, e2m1, e8m3, any eXmY, e7m7b127 = "
                        "bias 127) and/or the recipes bf16, fp8, coat as controls")
    p.add_argument("--lrs", type=_floats, required=True, help="comma-separated peak learning rates")
    p.add_argument("--seeds", type=int, default=2, help="seeds per (format, lr) (default 2)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ... (default 0)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel runs (default: min(CPU cores, cells to run) on CPU, 1 with --device cuda/auto)")
    g = p.add_argument_group("what is simulated")
    g.add_argument("--scaling", default=d.scaling, help="none | tensor | row | 1x16 | 1x128 (default tensor)")
    g.add_argument("--operands", default=d.operands,
                   help="which GEMM inputs take the format (default activations,weights,gradients)")
    g.add_argument("--grad-format", default=None, help="gradients' format instead of the entry's (e.g. e5m2)")
    g.add_argument("--include-lm-head", action="store_true", default=None,
                   help="simulate the LM head too (default: it stays unrounded, as in the FP8 recipes)")
    g = p.add_argument_group("training (shared by every cell)")
    g.add_argument("--model", default=d.model, help=f"size preset (default {d.model})")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--warmup-steps", type=int, default=None, help="default 5%% of --steps")
    g.add_argument("--schedule", default=d.schedule, choices=("cosine", "linear", "constant"))
    g.add_argument("--eval-every", type=int, default=None)
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--sharpness-every", type=int, default=None, help="default steps/20")
    g.add_argument("--sharpness-eps", type=float, default=d.sharpness_eps)
    g.add_argument("--data", default=None, help="default: this Python's standard library")
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--tokenizer-train-bytes", type=int, default=None)
    g.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    g.add_argument("--train-args", default="", help="extra `fp8train train` flags for every cell, quoted")
    g = p.add_argument_group("divergence and report")
    g.add_argument("--spike-factor", type=float, default=Thresholds.spike_factor,
                   help="diverged when the loss's moving mean exceeds this x its running minimum (default 1.5)")
    g.add_argument("--spike-window", type=int, default=Thresholds.window,
                   help="steps in the moving mean of the loss that the rule looks at (default 10; 1 = raw losses)")
    g.add_argument("--loss-cap", type=float, default=None, help="diverged when the loss exceeds this value")
    g.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs; train nothing")
    g.add_argument("--overwrite", action="store_true", help="delete the runs of an existing sweep in --out first")
    p.set_defaults(func=_sweep_command)
