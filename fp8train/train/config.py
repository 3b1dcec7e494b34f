"""The training run's settings: one dataclass, its command-line flags, and the checks that need no torch.

Every flag defaults to ``None`` on the command line so that ``--resume`` can tell what the user typed
(which overrides the saved run) from what they left out (which keeps the saved value).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import warnings
from typing import Optional

RECIPES = ("bf16", "fp8", "coat", "coat-lean")
MASTER_WEIGHTS = ("fp32", "bf16")
OPTIMIZERS = ("auto", "adamw", "fp8adamw")
SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")


class TrainError(Exception):
    """A problem the user can fix (bad data path, impossible settings, out of memory).

    The CLI prints the message and exits with status 1 instead of a traceback.
    """


@dataclasses.dataclass
class TrainConfig:
    # model and numerics
    model: str = "tiny"
    recipe: str = "bf16"
    optimizer: str = "auto"          # auto: fp8adamw for coat / coat-lean, torch AdamW otherwise
    master_weights: str = "fp32"      # bf16: bf16 parameters, stochastic rounding (needs fp8adamw)
    vocab_size: Optional[int] = None  # None: the preset's vocabulary
    device: str = "auto"
    nproc: int = 1                    # processes (one per GPU); > 1: FSDP2 sharding, DCP checkpoints
    fsdp_layers_per_unit: int = 1     # decoder layers per FSDP2 unit when sharded (fewer FSDP hooks on the host)
    compile: bool = False
    cuda_graph: bool = False          # replay each micro-batch's forward + backward as one CUDA graph
    step_in_backward: bool = False    # fp8train.AdamW updates each parameter inside backward (no gradient buffer)
    fp8_weight_cache: Optional[bool] = None  # FP8 weight copies made once per step (Recipe.cache_fp8_weights); None: the recipe's
    fp8_attention_saves: bool = False  # attention keeps q/k/v as FP8 copies for backward (Recipe.fp8_attention_saves)
    fused_qkv: bool = False           # q/k/v projections as one FP8 GEMM (Recipe.fused_qkv)
    # forward / input-gradient FP8 GEMMs without fp32 promotion (Recipe.fast_accumulation[_grad_input]); None: the
    # recipe's (coat-lean: on)
    fast_accumulation: Optional[bool] = None
    fast_accumulation_grad_input: Optional[bool] = None
    fused_residual: Optional[bool] = None  # residual gradients summed in the norm kernels (Recipe.fused_residual)
    delayed_scaling: Optional[bool] = None  # gated product's FP8 scales predicted (Recipe.delayed_scaling); None: the recipe's
    flash_attention: Optional[bool] = None  # FlashAttention-4 for the attention core (Recipe.flash_attention); None: where installed
    grad_checkpointing: bool = False
    # optimisation
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: Optional[float] = None        # None: the preset's learning rate
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: Optional[int] = None  # None: 5 % of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    # data
    data: Optional[str] = None        # None: this interpreter's standard-library sources
    text_field: str = "text"
    eval_fraction: float = 0.05
    tokenizer_train_bytes: int = 4_000_000
    cache_dir: Optional[str] = None
    # evaluation, logging, checkpoints
    eval_every: Optional[int] = None  # None: 10 evaluations per run
    eval_batches: int = 8
    log_every: int = 1
    out: Optional[str] = None
    checkpoint_every: Optional[int] = None  # None: steps/4; 0: only at the end; -1: never
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this many steps of this invocation
    overwrite: bool = False
    progress: bool = True
    # stability lab (fp8train.lab): simulated GEMM-input formats and last-token sharpness
    simulate_format: Optional[str] = None  # e.g. "e3m4" or "a=e3m4,w=e3m4,g=e5m2"; None: off
    simulate_scaling: str = "tensor"       # none | tensor | row | 1xG | BxB
    simulate_lm_head: bool = False         # also simulate the output head (kept bf16 by default)
    sharpness_every: int = 0               # 0: off
    sharpness_eps: float = 1e-3

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for field in ("fast_accumulation", "fast_accumulation_grad_input"):
            # a config written before the field existed (every saved config holds every field) ran those GEMMs with
            # fp32 promotion: a resumed run keeps doing so instead of taking coat-lean's default since session 16
            values.setdefault(field, False)
        return cls(**values)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all processes (each runs grad_accum micro-batches of batch_size)."""
        return self.batch_size * self.seq_len * self.grad_accum * self.nproc


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("FP8TRAIN_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fp8train"


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill in the derived defaults and check everything that can be checked before loading anything."""
    from .models import PRESETS

    c = dataclasses.replace(config)
    if c.recipe not in RECIPES:
        raise TrainError(f"unknown recipe {c.recipe!r}; choose one of {', '.join(RECIPES)}")
    if c.optimizer not in OPTIMIZERS:
        raise TrainError(f"unknown optimizer {c.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if c.schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if c.device not in DEVICES:
        raise TrainError(f"unknown device {c.device!r}; choose one of {', '.join(DEVICES)}")
    if c.model not in PRESETS:
        raise TrainError(f"unknown model preset {c.model!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[c.model]
    if c.master_weights not in MASTER_WEIGHTS:
        raise TrainError(f"unknown --master-weights {c.master_weights!r}; choose one of {', '.join(MASTER_WEIGHTS)}")
    if c.optimizer == "auto":
        c.optimizer = "fp8adamw" if c.recipe in ("coat", "coat-lean") or c.master_weights == "bf16" else "adamw"
    if c.cuda_graph:
        blockers = [flag for flag, on in (("--compile", c.compile), ("--grad-checkpointing", c.grad_checkpointing),
                                          ("--grad-accum > 1", c.grad_accum > 1),
                                          ("--device cpu", c.device == "cpu")) if on]
        if blockers:
            raise TrainError(f"--cuda-graph cannot be combined with {', '.join(blockers)}: it replays one captured "
                             "forward + backward per GPU (raise --batch-size instead of --grad-accum)")
    if c.fp8_weight_cache and (c.recipe == "bf16" or c.simulate_format is not None):
        raise TrainError("--fp8-weight-cache keeps FP8 copies of the weights of FP8 linear layers: it needs an FP8 "
                         "recipe (fp8, coat, coat-lean), not bf16 or --simulate-format")
    if c.fused_qkv and (c.recipe == "bf16" or c.simulate_format is not None):
        raise TrainError("--fused-qkv fuses FP8 linear layers: it needs an FP8 recipe (fp8, coat, coat-lean), not bf16 "
                         "or --simulate-format")
    for flag, on, which in (("--fast-accumulation", c.fast_accumulation, "forward"),
                            ("--fast-accumulation-grad-input", c.fast_accumulation_grad_input, "input-gradient")):
        if on and (c.recipe == "bf16" or c.simulate_format is not None):
            raise TrainError(f"{flag} changes the {which} GEMMs of FP8 linear layers: it needs an FP8 recipe "
                             "(fp8, coat, coat-lean), not bf16 or --simulate-format")
    if c.delayed_scaling and (c.recipe not in ("coat", "coat-lean") or c.simulate_format is not None):
        raise TrainError("--delayed-scaling changes how the FP8 fast path of coat / coat-lean scales the MLP's gated "
                         f"product; recipe {c.recipe!r}" + (" with --simulate-format" if c.simulate_format else "")
                         + " has none: use --recipe coat or coat-lean")
    if c.fp8_weight_cache and c.nproc > 1:
        raise TrainError("--fp8-weight-cache does nothing with --nproc > 1: FSDP2 gathers new unsharded weights "
                         "every step, which the cache leaves alone (it would otherwise undo the sharding); "
                         "leave it off for multi-GPU runs")
    if c.step_in_backward:
        blockers = [flag for flag, on in (("--optimizer adamw", c.optimizer != "fp8adamw"),
                                          ("--grad-accum > 1", c.grad_accum > 1), ("--nproc > 1", c.nproc > 1),
                                          ("--cuda-graph", c.cuda_graph),
                                          (f"--grad-clip {c.grad_clip:g} (use --grad-clip 0)", c.grad_clip > 0)) if on]
        if blockers:
            raise TrainError(f"--step-in-backward cannot be combined with {', '.join(blockers)}: each parameter is "
                             "updated as soon as its gradient exists, so every backward is a whole optimizer step "
                             "and no full set of gradients is ever there to clip, accumulate or reduce")
    if c.master_weights == "bf16" and c.optimizer != "fp8adamw":
        raise TrainError("--master-weights bf16 needs --optimizer fp8adamw: it rounds bf16 parameter updates "
                         "stochastically, where torch.optim.AdamW would lose updates smaller than bf16's step")
    if c.vocab_size is None:
        c.vocab_size = preset.vocab_size
    if c.lr is None:
        c.lr = preset.lr
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every", "vocab_size", "nproc",
                 "fsdp_layers_per_unit"):
        if getattr(c, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(c, name)})")
    if c.vocab_size < 258:
        raise TrainError(f"--vocab-size must be at least 258 (256 bytes + end-of-text + one merge), got {c.vocab_size}")
    if c.seq_len > preset.max_position_embeddings:
        raise TrainError(
            f"--seq-len {c.seq_len} is longer than model {c.model!r} supports "
            f"(max_position_embeddings={preset.max_position_embeddings}); lower --seq-len")
    if not 0.0 < c.eval_fraction < 1.0:
        raise TrainError(f"--eval-fraction must be between 0 and 1 (got {c.eval_fraction})")
    if c.lr <= 0:
        raise TrainError(f"--lr must be positive (got {c.lr})")
    if not 0.0 <= c.min_lr_ratio <= 1.0:
        raise TrainError(f"--min-lr-ratio must be in [0, 1] (got {c.min_lr_ratio})")
    if c.warmup_steps is None:
        c.warmup_steps = max(1, round(0.05 * c.steps)) if c.schedule != "constant" else 0
    if c.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be >= 0 (got {c.warmup_steps})")
    if c.eval_every is None:
        c.eval_every = max(1, c.steps // 10)
    if c.checkpoint_every is None:
        c.checkpoint_every = max(1, c.steps // 4) if c.steps >= 8 else 0
    if c.checkpoint_every < -1 or c.eval_every < 1:
        raise TrainError("--checkpoint-every must be >= -1 and --eval-every >= 1")
    if c.stop_after is not None and c.stop_after < 1:
        raise TrainError(f"--stop-after must be at least 1 (got {c.stop_after})")
    if c.keep_checkpoints < 1:
        raise TrainError(f"--keep-checkpoints must be at least 1 (got {c.keep_checkpoints})")
    if c.cache_dir is None:
        c.cache_dir = str(default_cache_dir())
    _check_lab_settings(c)
    if c.out is None:
        if c.resume:
            raise TrainError("--resume needs --out DIR: the run directory to continue")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        c.out = os.path.join("runs", f"{stamp}-{c.model}-{c.recipe}")
    return c


def _check_lab_settings(c: TrainConfig) -> None:
    """The stability-lab flags (--simulate-format, --sharpness-every); imports torch only when simulating."""
    if c.simulate_lm_head and c.simulate_format is None:
        raise TrainError("--simulate-lm-head needs --simulate-format")
    if c.simulate_format is not None:
        if c.recipe != "bf16":
            raise TrainError(f"--simulate-format replaces the linear layers with simulated ones; use it with "
                             f"--recipe bf16 (got --recipe {c.recipe})")
        from ..lab.simulated_linear import SimulatedFormats

        try:
            SimulatedFormats.parse(c.simulate_format, c.simulate_scaling)
        except ValueError as exc:
            raise TrainError(f"--simulate-format/--simulate-scaling: {exc}") from None
    if c.sharpness_every < 0:
        raise TrainError(f"--sharpness-every must be >= 0 (0 = off), got {c.sharpness_every}")
    if c.sharpness_eps <= 0:
        raise TrainError(f"--sharpness-eps must be positive, got {c.sharpness_eps}")


def simulated_recipe(c: TrainConfig):
    """The fp8train.Recipe of a run with --simulate-format (None without it)."""
    if c.simulate_format is None:
        return None
    from ..lab.simulated_linear import SimulatedFormats
    from ..recipes import Recipe

    formats = SimulatedFormats.parse(c.simulate_format, c.simulate_scaling)
    keep = Recipe().keep_bf16
    if c.simulate_lm_head:
        keep = tuple(name for name in keep if name != "lm_head")
    return Recipe(name=f"simulate[{formats.describe()}]", simulate=formats, keep_bf16=keep)


# ----------------------------------------------------------------------------------------------------------
# command line

def add_train_arguments(parser: argparse.ArgumentParser, *, single_run: bool = True) -> None:
    """All run settings as flags.  Defaults are None here; TrainConfig holds the real defaults."""
    from .models import PRESET_HELP

    d = TrainConfig()
    S = argparse.SUPPRESS
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=S, help=f"size preset: {PRESET_HELP} (default {d.model})")
    if single_run:
        g.add_argument("--recipe", default=S,
                       help=f"numerics: {' | '.join(RECIPES)} (default {d.recipe}); unknown names are refused")
    g.add_argument("--optimizer", default=S, choices=OPTIMIZERS,
                   help="adamw = torch.optim.AdamW, fp8adamw = fp8train.AdamW (FP8 states); "
                        "auto = fp8adamw for coat / coat-lean, adamw otherwise")
    g.add_argument("--master-weights", default=S, choices=MASTER_WEIGHTS,
                   help="fp32 (default): fp32 parameters under bf16 autocast; bf16: bf16 parameters updated with "
                        "stochastic rounding by fp8train.AdamW -- no fp32 copy, bf16 gradients (the lean set-up: "
                        "with --recipe coat-lean)")
    g.add_argument("--vocab-size", type=int, default=S, help="BPE vocabulary (default: the preset's)")
    g.add_argument("--device", default=S, choices=DEVICES, help="default auto: cuda when available")
    g.add_argument("--nproc", type=int, default=S,
                   help="processes, one per GPU (default 1): N > 1 shards the model over N GPUs with FSDP2 (N CPU "
                        "processes with --device cpu) and writes distributed checkpoints that resume on any N; "
                        "--batch-size and --grad-accum are per process.  Under torchrun the launcher sets N")
    g.add_argument("--fsdp-layers-per-unit", type=int, default=S, metavar="N",
                   help="with --nproc > 1 (or torchrun): N consecutive decoder layers per FSDP2 unit (default 1).  "
                        "2 halves FSDP's per-unit host work (953M, one H100, one process: the median step 11-13 %% shorter) for "
                        "one more layer's gathered weights in memory; the same results bit for bit")
    g.add_argument("--compile", action="store_true", default=S, help="torch.compile the model")
    g.add_argument("--cuda-graph", action="store_true", default=S,
                   help="capture forward + backward once and replay it as a CUDA graph (removes the Python cost "
                        "of eager FP8 training; CUDA only, --grad-accum 1, no --compile / --grad-checkpointing).  "
                        "With --nproc > 1 FSDP2's all-gathers and reduce-scatters are captured too (953M and 7B, 2 GPUs: "
                        "95-98 %% scaling)")
    g.add_argument("--step-in-backward", action="store_true", default=S,
                   help="fp8train.AdamW updates each parameter as soon as backward produced its gradient and frees "
                        "it: no full gradient buffer (needs --grad-clip 0, --grad-accum 1, one process, no "
                        "--cuda-graph); the logged grad_norm is then null")
    g.add_argument("--fp8-weight-cache", action=argparse.BooleanOptionalAction, default=S,
                   help="quantize every weight once per optimizer step (both layouts, one batched pass) and reuse "
                        "the FP8 copies until the next step: far fewer kernels (eager 953M: 1.41x tokens/s), for 2 "
                        "extra bytes per linear weight parameter (13 GB at 7B); the same results bit for bit.  "
                        "coat-lean has it on; --no-fp8-weight-cache turns it off")
    g.add_argument("--fp8-attention-saves", action="store_true", default=S,
                   help="experimental: the attention core keeps q/k/v for backward as E4M3 copies (about half its "
                        "saved bytes) and reruns its forward in backward: slower attention, ~5 %% gradient error "
                        "on its inputs (docs/convert.md)")
    g.add_argument("--fused-qkv", action="store_true", default=S,
                   help="run the q/k/v projections of each attention block as one FP8 GEMM (one scale for the "
                        "stacked weights and one for their gradients; needs an FP8 recipe)")
    g.add_argument("--fast-accumulation", action=argparse.BooleanOptionalAction, default=S,
                   help="forward FP8 GEMMs accumulate in the tensor cores' own precision instead of promoting partial "
                        "sums to fp32 (TransformerEngine's and torchao's forward default); default: the recipe's -- "
                        "coat-lean has it on, fp8 and coat off")
    g.add_argument("--fast-accumulation-grad-input", action=argparse.BooleanOptionalAction, default=S,
                   help="the same for the input-gradient FP8 GEMMs (dX = dY W); weight-gradient GEMMs (contracting "
                        "over all tokens) always promote to fp32; default: the recipe's (coat-lean: on)")
    g.add_argument("--fused-residual", action=argparse.BooleanOptionalAction, default=S,
                   help="Llama-style layers sum their residual gradients in the norms' backward kernels instead of "
                        "autograd's bf16 adds (same forward, gradients rounded once); on by default with the FP8 "
                        "recipes' fast path, --no-fused-residual turns it off")
    g.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=S,
                   help="the attention core of Llama-style blocks runs FlashAttention-4 (pip install fp8train[flash], "
                        "sm90/sm100 GPUs); by default wherever it is installed, --flash-attention also warns when a "
                        "call falls back to SDPA, --no-flash-attention keeps SDPA")
    g.add_argument("--delayed-scaling", action=argparse.BooleanOptionalAction, default=S,
                   help="the MLP's act(gate)*up and its two gradients are encoded to FP8 in the pass that computes "
                        "them, with a scale predicted from the previous step (2x its amax), instead of an amax pass "
                        "plus an encoding pass; a repair pass re-encodes just in time when the prediction was off, "
                        "so nothing saturates.  coat-lean has it on (--no-delayed-scaling: just-in-time scales); "
                        "--delayed-scaling adds it to coat")
    g.add_argument("--grad-checkpointing", action="store_true", default=S,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=S, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--batch-size", type=int, default=S, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, default=S, help=f"tokens per sequence (default {d.seq_len})")
    g.add_argument("--grad-accum", type=int, default=S, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default: the preset's)")
    g.add_argument("--schedule", default=S, choices=SCHEDULES, help=f"decay after warmup (default {d.schedule})")
    g.add_argument("--warmup-steps", type=int, default=S, help="linear warmup steps (default 5%% of --steps)")
    g.add_argument("--min-lr-ratio", type=float, default=S, help=f"final lr / peak lr (default {d.min_lr_ratio})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"decoupled weight decay (default {d.weight_decay})")
    g.add_argument("--beta1", type=float, default=S)
    g.add_argument("--beta2", type=float, default=S)
    g.add_argument("--eps", type=float, default=S)
    g.add_argument("--grad-clip", type=float, default=S, help=f"max gradient norm, 0 = off (default {d.grad_clip})")
    g.add_argument("--seed", type=int, default=S, help=f"seed for init and data order (default {d.seed})")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=S,
                   help="a text file, a directory of text files, or a .jsonl file with a text field "
                        "(default: this Python's standard-library sources)")
    g.add_argument("--text-field", default=S, help="field of each .jsonl record to train on (default text)")
    g.add_argument("--eval-fraction", type=float, default=S, help="share of documents held out (default 0.05)")
    g.add_argument("--tokenizer-train-bytes", type=int, default=S,
                   help="train the BPE on this many bytes of documents (default 4e6)")
    g.add_argument("--cache-dir", default=S, help="tokenizer/token cache (default $FP8TRAIN_CACHE or ~/.cache/fp8train)")
    g = parser.add_argument_group("outputs")
    g.add_argument("--out", default=S, help="run directory (default runs/<time>-<model>-<recipe>)")
    g.add_argument("--eval-every", type=int, default=S, help="evaluate every N steps (default steps/10)")
    g.add_argument("--eval-batches", type=int, default=S, help="batches per evaluation (default 8)")
    g.add_argument("--log-every", type=int, default=S, help="write metrics every N steps (default 1)")
    g.add_argument("--checkpoint-every", type=int, default=S,
                   help="checkpoint every N steps; 0 = only at the end, -1 = never (default steps/4)")
    g.add_argument("--keep-checkpoints", type=int, default=S, help="how many recent checkpoints to keep (default 2)")
    if single_run:
        g.add_argument("--resume", action="store_true", default=S,
                       help="continue from the latest checkpoint in --out (its config.json supplies the settings)")
        g.add_argument("--stop-after", type=int, default=S,
                       help="stop after N steps of this invocation with a checkpoint, as if interrupted")
    g.add_argument("--overwrite", action="store_true", default=S, help="reuse a non-empty --out, deleting its run")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no live progress bar")
    g = parser.add_argument_group("stability lab (docs/lab.md)")
    g.add_argument("--simulate-format", default=S, metavar="SPEC",
                   help="round the GEMM inputs of every linear to a simulated format: e3m4 (activations, weights "
                        "and gradients) or a=e3m4,w=e3m4,g=e5m2 (g=none: leave one out); any eXmY, e.g. e2m1, e8m3, "
                        "e7m7b127 (bias 127); needs --recipe bf16")
    g.add_argument("--simulate-scaling", default=S, metavar="SCALING",
                   help="none | tensor | row | 1x16 | 1x128 | 128x128 (default tensor)")
    g.add_argument("--simulate-lm-head", action="store_true", default=S,
                   help="also round the LM head's GEMM inputs (kept in bf16 by default)")
    g.add_argument("--sharpness-every", type=int, default=S, metavar="K",
                   help="log the last-token epsilon-sharpness of a fixed eval batch every K steps (default 0 = off)")
    g.add_argument("--sharpness-eps", type=float, default=S, help="epsilon of the sharpness box (default 1e-3)")


# settings whose change on --resume makes the continuation differ from an uninterrupted run
_DECIDES_LOSSES = ("model", "recipe", "optimizer", "master_weights", "vocab_size", "steps", "batch_size", "seq_len",
                   "grad_accum", "lr", "min_lr_ratio", "schedule", "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
                   "seed", "data", "text_field", "eval_fraction", "tokenizer_train_bytes")
_DECIDES_LOSSES += ("simulate_format", "simulate_scaling", "simulate_lm_head", "step_in_backward",
                    "fp8_attention_saves", "fused_qkv", "fused_residual", "delayed_scaling",
                    "fast_accumulation", "fast_accumulation_grad_input")


def _keep_global_batch(base: TrainConfig, typed: dict, changed: list) -> dict:
    """On a resume with another number of processes, the grad_accum that keeps the micro-batches of a step.

    The run continues with the same data per step (and the same losses, up to the order gradients are summed)
    when the new world size divides ``grad_accum x old world size``; ``--grad-accum`` typed by the user wins.
    """
    world = typed.get("nproc")
    if world is None and "WORLD_SIZE" in os.environ:  # torchrun decides the world size
        world = int(os.environ["WORLD_SIZE"])
    if world is None or world == base.nproc or "grad_accum" in typed:
        return {}
    micro_batches = base.grad_accum * base.nproc
    if micro_batches % world:
        changed.append(f"micro-batches per step {micro_batches} -> a multiple of {world} processes")
        return {}
    keep = {"grad_accum": micro_batches // world}
    if keep["grad_accum"] > 1 and base.cuda_graph and "cuda_graph" not in typed:
        # a CUDA graph replays one micro-batch per step; the same steps then run eager (same losses)
        warnings.warn(f"resuming on {world} process{'es' if world > 1 else ''} with --grad-accum "
                      f"{keep['grad_accum']}: the saved run's --cuda-graph is off for this run (a graph replays "
                      "one micro-batch per step); the losses are unchanged", stacklevel=3)
        keep["cuda_graph"] = False
    return keep


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed flags; with --resume, the saved run's config with the typed flags on top."""
    typed = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if typed.get("resume") and typed.get("out"):
        saved = pathlib.Path(typed["out"]) / "config.json"
        if saved.is_file():
            base = TrainConfig.from_json(json.loads(saved.read_text())["train"])
            for key in ("resume", "stop_after", "overwrite", "progress"):
                setattr(base, key, getattr(TrainConfig(), key))
            changed = [f"{k} {getattr(base, k)!r} -> {v!r}" for k, v in typed.items()
                       if k in _DECIDES_LOSSES and v != getattr(base, k)]
            typed.update(_keep_global_batch(base, typed, changed))
            if changed:
                warnings.warn(f"resuming with changed settings ({', '.join(changed)}): the run continues, but its "
                              f"losses will differ from an uninterrupted run", stacklevel=2)
            return dataclasses.replace(base, **typed)
    return TrainConfig(**typed)
