"""Settings of the fine-tuning job (`python -m chronicals finetune`), one frozen dataclass.

Every field has a default, so `FinetuneConfig()` is the built-in job: a tiny Qwen2-shaped model
built from a config, the bundled tokenizer and the bundled HumanEval data (chronicals/data/).
"""

from __future__ import annotations

import dataclasses
import math

from chronicals.packing import OVERLONG_POLICIES as OVERLONG

COMPILE_BACKENDS = ("chronicals", "inductor", "aot_eager", "none")
DTYPES = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")
LORA_DTYPES = ("fp32", "model")
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
    model: str | None = None
    """Hugging Face model id or local directory; None: the built-in tiny model."""
    from_config: bool = False
    """Build `model` from its config.json with random weights instead of loading weights."""
    tokenizer: str | None = None
    """Tokenizer id or directory; None: the model's own, or the bundled one for the built-in
    model."""
    data: str | None = None
    """Local .json/.jsonl/.parquet file or a `datasets` name; None: the bundled HumanEval."""
    data_split: str = "train"
    attn_implementation: str = "auto"
    """transformers attention; 'auto': Chronicals' variable-length attention for packed rows
    (`chronicals.attention`, documents never attend to each other), 'sdpa' for padded rows."""
    max_len: int = 1024
    packing: bool = True
    overlong: str = "error"
    """Examples longer than max_len: 'error', 'truncate' or 'split' (into pieces that overlap by
    one token, so every label is trained on); see `chronicals.data.make_rows`."""
    batch_size: int = 2
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steps: int | None = None
    """Optimizer steps; None: DEFAULT_STEPS, or those of `epochs`. Resuming with more extends the
    run from its checkpoint: the learning-rate schedule (and the default warm-up, 5% of the
    steps) is recomputed for the new total."""
    epochs: int | None = None
    """Passes over the training rows instead of `steps`: ceil(epochs x rows / (batch_size x
    grad_accum)) steps, so every row is trained on `epochs` times (the last step's batch may be
    filled up with rows of the next pass). Not with `steps`."""
    lr: float | None = None
    """None: 2e-4 with LoRA, 2e-5 for a full fine-tune, 2e-3 for the built-in (untrained) model."""
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    """None: 5% of the steps."""
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): less memory, about a third more
    compute. The backend fuses inside checkpointed layers as outside them."""
    max_grad_norm: float | None = 1.0
    lora_r: int = 0
    """LoRA rank; 0: full fine-tune."""
    lora_alpha: float | None = None
    """None: equal to the rank."""
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    lora_plus_ratio: float = 16.0
    lora_dtype: str = "fp32"
    """Adapter weights' dtype: 'fp32' (PEFT's default: each adapted linear casts its input to fp32
    and runs fp32 GEMMs) or 'model' (the weights' dtype, e.g. bf16: 43% more LoRA r=32 tokens/s on
    an H200 in benchmarks/bench_train.py, at bf16 precision for the adapters and their updates)."""
    eval_fraction: float = 0.05
    eval_every: int = 10
    """Steps between evaluations (and one at the end); 0: only at the end."""
    save_every: int = 0
    """Steps between checkpoints (and one at the end); 0: only at the end."""
    log_every: int = 10
    """Steps between reading metrics from the device; every step is logged all the same."""
    resume: str | None = None
    """A checkpoint directory, or 'auto': the latest checkpoint of the run in output_dir (of the
    line that ran last, see chronicals.checkpoint), or its start if it stopped before its first."""
    allow_data_change: bool = False
    """Resume on data whose fingerprint (a hash of the tokenised examples) differs from the run's;
    without it that is an error."""
    skip_nonfinite: int = 0
    """Steps with a NaN or infinite loss or gradient norm to skip (the optimizer does not step)
    before the next one stops the run; 0: the first stops it. Above 0, detecting them in time
    reads the loss and norm every step (one device sync a step). A stopped run keeps its last
    good checkpoint."""
    output_dir: str = "chronicals-out"
    seed: int = 0
    compile: str = "chronicals"
    """torch.compile backend of the loss function, one of COMPILE_BACKENDS ('none': eager)."""
    dtype: str = "auto"
    """'auto': bf16 on CUDA, fp32 on CPU."""
    device: str = "auto"
    plot: bool = True
    progress: bool = True

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
            (self.compile in COMPILE_BACKENDS,
             f"compile must be one of {COMPILE_BACKENDS}. Got {self.compile!r}."),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}. Got {self.dtype!r}."),
            (self.lora_dtype in LORA_DTYPES,
             f"lora_dtype must be one of {LORA_DTYPES}. Got {self.lora_dtype!r}."),
            (self.lr_schedule in SCHEDULES,
             f"lr_schedule must be one of {SCHEDULES}. Got {self.lr_schedule!r}."),
            (self.overlong in OVERLONG,
             f"overlong must be one of {OVERLONG}. Got {self.overlong!r}."),
            (not self.from_config or self.model is not None,
             "from_config needs a model (a config.json file or a directory holding one)."),
        ]
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
