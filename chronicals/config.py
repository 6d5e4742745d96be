"""Settings of the fine-tuning job (`python -m chronicals finetune`), one frozen dataclass.

Every field has a default, so `FinetuneConfig()` is the built-in job: a tiny Qwen2-shaped model
built from a config, the bundled tokenizer and the bundled HumanEval data (chronicals/data/).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math

from chronicals.packing import OVERLONG_POLICIES as OVERLONG

COMPILE_BACKENDS = ("chronicals", "inductor", "aot_eager", "none")
DTYPES = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")
LORA_DTYPES = ("fp32", "model")
LORA_PRECISIONS = ("mixed", "exact")  # the chronicals backend's lora_precision option
CHOICES = {"overlong": OVERLONG, "lr_schedule": SCHEDULES, "compile": COMPILE_BACKENDS,
           "dtype": DTYPES, "lora_dtype": LORA_DTYPES, "lora_precision": LORA_PRECISIONS}
"""The fields that take one of a few values, and those values."""
DEFAULT_STEPS = 40
"""Optimizer steps of a run given neither `steps` nor `epochs`."""

# Settings a resumed run may change: where and how often it reports and saves, how it compiles
# (compiled and eager steps compute the same thing), what it does with a non-finite step, where
# its data comes from (the data's content is checked by its fingerprint instead, see
# chronicals.checkpoint), whether activations are recomputed (gradient checkpointing: the same
# values), and how long it runs (a higher `steps` extends a run: the learning-rate
# schedule is recomputed for the new total, see chronicals.cli). Every other field must equal the
# checkpoint's, or the resumed run would not continue the same run.
RESUME_MAY_CHANGE = frozenset(
    {"output_dir", "resume", "eval_every", "save_every", "log_every", "compile", "device",
     "plot", "progress", "data", "data_split", "allow_data_change", "skip_nonfinite", "steps",
     "epochs", "gradient_checkpointing"}
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Each field's docstring is also its command-line help (chronicals.cli): `other_field` reads
    there as --other-field, and a field whose default is None says what None means as "None: ..."
    (on the command line, "default: ...")."""

    model: str | None = None
    """Hugging Face model id or local directory; None: the built-in tiny Qwen2-shaped model."""
    from_config: bool = False
    """Build `model` (a config.json or a directory holding one) with random weights instead of
    loading its weights."""
    tokenizer: str | None = None
    """Tokenizer id or directory; None: the model's own, or the bundled one for the built-in
    model."""
    data: str | None = None
    """A local file: .json (a JSON array of records, or JSON lines), .jsonl or .parquet; or a
    `datasets` name. Records have 'messages' (chat, at least one assistant reply) or
    'prompt'/'completion'; None: the bundled HumanEval."""
    data_split: str = "train"
    """Split of a `datasets` name."""
    attn_implementation: str = "auto"
    """transformers attention; auto: Chronicals' variable-length attention (chronicals_varlen,
    documents never attend to each other) for packed rows, sdpa for padded rows."""
    max_len: int = 1024
    """Row length in tokens."""
    packing: bool = True
    """Several examples packed per row (best-fit decreasing, chronicals.packing); off: one
    example per row, padded."""
    overlong: str = "error"
    """Examples longer than `max_len` tokens: error, truncate (keep the first `max_len` tokens;
    examples left without labels are counted), or split (into pieces of `max_len` tokens
    overlapping by one, so every label is trained on); see chronicals.data.make_rows."""
    batch_size: int = 2
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int | None = None
    """Optimizer steps; higher on `resume` extends the run from its checkpoint, with the
    learning-rate schedule (and the default warm-up) recomputed for the new total. Not with
    `epochs`. None: `DEFAULT_STEPS`, or those of `epochs`."""
    epochs: int | None = None
    """Passes over the training rows instead of `steps`: ceil(epochs x rows / (batch size x grad
    accum)) steps, so every row is trained on `epochs` times (the last step's batch may be filled
    up with rows of the next pass); None: off, `steps`."""
    lr: float | None = None
    """Peak learning rate; None: 2e-4 with LoRA, 2e-5 for a full fine-tune, 2e-3 for the
    built-in (untrained) model."""
    lr_schedule: str = "cosine"
    """After warm-up: cosine down to 10% of `lr` at the last step, or constant."""
    warmup_steps: int | None = None
    """Steps of linear warm-up to `lr`; None: 5% of the steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of the weight matrices: each step scales them by 1 - lr x
    this."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): less memory, about a third more
    compute; the backend fuses inside checkpointed layers as outside them."""
    max_grad_norm: float | None = 1.0
    """Clip the L2 norm of all gradients to this; no clipping: None (on the command line, 0)."""
    lora_r: int = 0
    """LoRA rank; 0: full fine-tune."""
    lora_alpha: float | None = None
    """LoRA scale numerator: the update is scaled by alpha / rank; None: the rank, a scale of
    1."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA input, in [0, 1)."""
    lora_target: str = "all-linear"
    """all-linear, or comma-separated names of the model's layers (e.g. q_proj,v_proj)."""
    lora_plus_ratio: float = 16.0
    """LoRA+: learning rate of B over that of A."""
    lora_dtype: str = "fp32"
    """Adapter weights' dtype: fp32 (PEFT's default: each adapted linear casts its input to fp32
    and runs fp32 GEMMs) or model (the weights' dtype, e.g. bf16: 43% more LoRA r=32 tokens/s on
    an H200 in benchmarks/bench_train.py, at bf16 precision for the adapters and their
    updates)."""
    lora_precision: str = "mixed"
    """How the chronicals backend computes fp32 adapters on a bf16/fp16 model: mixed (as
    torch.autocast would: adapter GEMMs in the model's dtype against the fp32 weights, whose
    gradients stay fp32) or exact (PEFT's fp32 adapter math as written)."""
    eval_fraction: float = 0.05
    """Fraction of the examples held out for the evaluation loss, in [0, 1)."""
    eval_every: int = 10
    """Steps between evaluations, and one at the end; 0: only at the end."""
    save_every: int = 0
    """Steps between checkpoints, and one at the end; 0: only at the end."""
    log_every: int = 10
    """Steps between reading metrics from the device; every step is logged all the same."""
    resume: str | None = None
    """Checkpoint directory to continue from, or 'auto': the latest checkpoint of the run in
    `output_dir` (of the line that ran last, see chronicals.checkpoint), or its start if it
    stopped before its first; a finished run (final/ written) is left as it is. None: a fresh
    run."""
    allow_data_change: bool = False
    """Resume on data other than the run's (its fingerprint, a hash of the tokenised examples,
    differs); without it that is an error."""
    skip_nonfinite: int = 0
    """Skip up to this many steps whose loss or gradient norm is NaN or infinite (the optimizer
    does not step; detecting them reads the loss and norm every step, one device sync a step);
    the next stops the run, keeping its last good checkpoint; 0: the first stops it."""
    output_dir: str = "chronicals-out"
    """Directory of the log, checkpoints and final model."""
    seed: int = 0
    """Seed of the initialisation, eval split and row order."""
    compile: str = "chronicals"
    """torch.compile backend of the loss function; none: eager."""
    dtype: str = "auto"
    """Weights' dtype; auto: bf16 on CUDA, fp32 on CPU."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N; auto: cuda if a GPU is available, else cpu."""
    plot: bool = True
    """Write metrics.png (chronicals.plot) at each evaluation."""
    progress: bool = True
    """A progress bar when stderr is a terminal (log lines otherwise); off: a log line per
    `log_every` steps."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_len >= 2,
             f"max_len must be >= 2 (one input and one label). Got {self.max_len}."),
            (self.batch_size >= 1, f"batch_size must be >= 1. Got {self.batch_size}."),
            (self.grad_accum >= 1, f"grad_accum must be >= 1. Got {self.grad_accum}."),
            (self.steps is None or self.epochs is None,
             f"give steps or epochs, not both. Got steps={self.steps} and epochs={self.epochs}."),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1. Got {self.steps}."),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1. Got {self.epochs}."),
            (self.lr is None or 0 < self.lr < math.inf,
             f"lr must be finite and > 0. Got {self.lr}."),
            (self.lora_r >= 0, f"lora_r must be >= 0 (0: full fine-tune). Got {self.lora_r}."),
            (self.lora_alpha is None or 0 < self.lora_alpha < math.inf,
             f"lora_alpha must be finite and > 0, or None. Got {self.lora_alpha}."),
            (0 <= self.lora_dropout < 1,
             f"lora_dropout must be in [0, 1). Got {self.lora_dropout}."),
            (0 < self.lora_plus_ratio < math.inf,
             f"lora_plus_ratio must be finite and > 0. Got {self.lora_plus_ratio}."),
            (0 <= self.eval_fraction < 1,
             f"eval_fraction must be in [0, 1). Got {self.eval_fraction}."),
            (min(self.eval_every, self.save_every) >= 0 and self.log_every >= 1,
             ("eval_every and save_every must be >= 0 and log_every >= 1. Got "
              f"{self.eval_every}, {self.save_every}, {self.log_every}.")),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self._steps_bound(),
             (f"warmup_steps must be in [0, steps={self._steps_bound()}]. Got "
              f"{self.warmup_steps}.")),
            (self.max_grad_norm is None or 0 < self.max_grad_norm < math.inf,
             f"max_grad_norm must be finite and > 0, or None. Got {self.max_grad_norm}."),
            (self.skip_nonfinite >= 0,
             f"skip_nonfinite must be >= 0. Got {self.skip_nonfinite}."),
            (0 <= self.weight_decay < math.inf,
             f"weight_decay must be finite and >= 0. Got {self.weight_decay}."),
            (not self.from_config or self.model is not None,
             "from_config needs a model (a config.json file or a directory holding one)."),
        ]
        checks += [(getattr(self, name) in allowed,
                    f"{name} must be one of {allowed}. Got {getattr(self, name)!r}.")
                   for name, allowed in CHOICES.items()]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"finetune: {message}")

    def _steps_bound(self) -> float:
        """The steps, or an upper bound before the data gives those of `epochs`."""
        if self.steps is not None:
            return self.steps
        return DEFAULT_STEPS if self.epochs is None else math.inf

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def field_docs() -> dict[str, str]:
    """Each FinetuneConfig field's docstring (the string under it), white space folded."""
    source = ast.parse(inspect.getsource(FinetuneConfig))
    body = source.body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in itertools.pairwise(body)
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    }
