"""Training configuration: a tree of dataclasses, read from TOML, changed by dotted overrides.

`behemoth train --config run.toml --optim.lr=3e-4 --train.steps=2000`. Every key is checked: an
unknown one is an error that suggests the closest valid key, a value of the wrong type is an error
naming the key. The architecture lives in `behemoth.config.ModelConfig`; this file holds only the
knobs of a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class ModelSection:
    preset: str = "mini-behemoth"  # a name from behemoth.PRESETS
    config_file: str | None = None  # or a config.json (native or transformers); overrides preset
    vocab_size: int | None = None  # None: a new model takes its tokenizer's size; set: this size (>= it)


@dataclass
class DataSection:
    path: str | None = None  # file or glob of .txt/.jsonl/.parquet; None: the built-in STEM tasks
    field: str = "text"  # the text field of .jsonl / column of .parquet (a record without it: its "completion")
    # (`prompt_field` below also applies to text: a record's prompt comes before its text and is not trained on)
    tokenizer: str | None = None  # a tokenizer.json; None: char-level for tasks, a BPE trained on the corpus
    tokenizer_vocab_size: int = 2048  # when a BPE is trained on the corpus
    seq_len: int = 256
    val_fraction: float = 0.01
    cache_dir: str = ".cache/behemoth"  # tokenized corpora (keyed by corpus and tokenizer hashes)
    tasks: list[str] | None = None  # built-in task names (None: all)
    num_problems: int = 50000  # built-in training problems
    difficulty: int = 1
    # Image-text data (needs a model with a vision tower): `path` is a JSONL of {image: path or [paths],
    # text, prompt (optional, not trained on)}, or with no path the built-in visual tasks (`tasks` from
    # count, digit, bigger). One example per row, padded to seq_len.
    images: bool = False
    image_field: str = "image"
    prompt_field: str = "prompt"
    max_tiles: int = 16  # image tiles per image at most


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only (not norms, not biases)
    grad_clip: float = 1.0  # max global grad norm; 0 disables


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
"""The KD divergences (`distill.loss`, `distill.on_policy_loss`; train/kd.py)."""

BIAS_RULES: dict[str, float] = {"adaptive": 0.01, "proportional": 0.01, "sign": 1e-3}
"""Routing-bias update rules (`router.bias_update`, train/balance.py) and each one's default rate."""


@dataclass
class RouterSection:
    # auxiliary-loss-free balancing, a per-expert bias used only to select experts (train/balance.py): adaptive
    # (a step per expert that grows while its load error keeps its sign and halves when it flips) | proportional
    # (the step follows the load error) | sign (DeepSeek-V3: a fixed step, gamma = 1e-3)
    bias_update: str = "adaptive"
    bias_update_rate: float | None = None  # None: the rule's default (BIAS_RULES); adaptive: the first step (its
    # floor is a tenth of it); 0: no bias
    bias_max_step: float = 0.05  # adaptive: the largest step
    balance_loss_coef: float = 0.0  # Switch-style load-balancing loss over the micro-batch (Switch: 0.01)
    seq_balance_loss_coef: float = 0.0  # the same loss per sequence (DeepSeek-V3's complementary loss: 1e-4)
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE, OLMoE: 0.001)
    # training only: the standard deviation of Gaussian noise on the biased logits when experts are selected (never
    # on the weights), which splits groups of identical tokens that token-choice routing sends to one expert
    # whatever the biases (a picture's plain background makes many identical patch tokens; train/balance.py). Off
    # by default: on the vision recipe at lr 1e-3, 0.3 balanced every seed but one seed in three did not learn; the
    # demo's multimodal run uses 0.3 at lr 5e-4, where every seed learned (README)
    selection_noise: float = 0.0

    @property
    def bias_rate(self) -> float:
        """The bias step in use: `bias_update_rate`, or the rule's default when that is unset."""
        return BIAS_RULES[self.bias_update] if self.bias_update_rate is None else self.bias_update_rate


@dataclass
class DistillSection:
    """`behemoth distill` (a frozen teacher) and `behemoth codistill` (the teacher trains alongside)."""

    # distill: the teacher (with its tokenizer.json): a native checkpoint, a run directory (its latest checkpoint),
    # or a transformers directory of any causal LM family
    teacher: str | None = None
    # distill: or a teacher cache from `behemoth distill-cache` (no teacher model needed). Checked against
    # the run first: tokenizer, data and seq_len must be the cache's; top_k 0 (the cache's k) or <= k;
    # temperature == the cache's (top-k log-probs cannot be re-tempered exactly)
    cache: str | None = None
    teacher_preset: str = "mini-behemoth"  # codistill: the teacher built and trained in the same run
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | skew_reverse_kl | tvd
    temperature: float = 1.0
    beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL
    skew: float = 0.1  # skew KLs
    top_k: int = 0  # 0: the teacher's full distribution; k: its top-k only (as an offline cache holds)
    missing_mass: str = "renormalize"  # top-k: renormalize | ignore | residual
    schedule: str = "constant"  # weight of the soft loss: constant | linear | wsd
    alpha: float = 0.5  # total = (1 - alpha) CE + alpha KD; the constant, linear end or wsd plateau
    alpha_start: float = 0.0
    alpha_end: float = 0.0
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    token_rule: str = "none"  # per-token factor: none | confidence | certainty | loss_ratio
    # distill: the student's tokenizer. "teacher": the teacher's unless data.tokenizer names one; "own": chosen as
    # without a teacher (data.tokenizer, the character tokenizer for the built-in tasks, or a BPE trained on the
    # corpus). When it differs from the teacher's, distillation runs across tokenizers (`cross_method`).
    tokenizer: str = "teacher"
    # across tokenizers: aligned (the teacher's distribution moved onto the student's tokens, at positions where
    # both tokenizations reach the same text) | uld (sorted probabilities, Wasserstein) | hybrid (both)
    cross_method: str = "aligned"
    uld_weight: float = 1.0  # hybrid: the weight of the ULD term on the tokens the vocabularies do not share
    # aligned, hybrid: which teacher tokens map onto the student's: exact (identical text only) | prefix (also
    # those the student lacks, to the student token their text begins with) | marginal (prefix, and with aligned
    # also at positions inside a teacher token, given the bytes of it read so far; `train/token_align.py`).
    # benchmarks/cross_family.py measures them: marginal, the default, is the one that beats scratch there
    vocab_match: str = "marginal"
    # the frozen teacher's weights (any family): auto (bf16 when the run uses bf16 autocast, else fp32) | fp32 | bf16
    teacher_dtype: str = "auto"
    # On-policy distillation (`train/on_policy.py`): the share of optimizer steps whose micro-batches are the
    # student's own completions of prompts, graded by the teacher token by token (0: none, today's KD; 1: all)
    on_policy: float = 0.0
    on_policy_loss: str = "reverse_kl"  # the divergence at the student's tokens (any of `loss`'s)
    on_policy_start: float = 0.0  # the share of the run before rollouts begin (a logit-distillation warm start)
    # where prompts come from: auto (tasks on the built-in tasks, else corpus) | tasks (the built-in tasks' training
    # prompts) | corpus (the first on_policy_prefix tokens of each row of the batch) | a .jsonl or text prompt file
    on_policy_prompts: str = "auto"
    on_policy_prefix: int = 32
    on_policy_rows: int = 0  # prompts per rollout micro-batch (0: the micro-batch's rows)
    on_policy_tokens: int = 64  # the most tokens the student writes per prompt
    on_policy_temperature: float = 1.0  # the student's sampling temperature (0: greedy)


@dataclass
class TrainSection:
    steps: int = 500  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    out_dir: str = "runs/train"


@dataclass
class LogSection:
    every: int = 10  # progress and metrics cadence (optimizer steps)
    health_every: int = 50  # routing-health cadence (optimizer steps)
    eval_every: int = 100  # validation loss cadence; 0 disables
    eval_batches: int = 8
    tensorboard: bool = True  # when the tensorboard package is installed
    plots: bool = True  # PNG plots at the end


@dataclass
class HealthSection:
    collapse_share: float = 0.5  # warn when one expert takes more than this share of a layer's tokens
    dead_windows: int = 3  # warn when an expert gets no tokens in this many health windows in a row
    # warn when the flip rate (the share of the probe's routed slots that changed expert between health windows)
    # is at least this fraction of a random reassignment's (1 - top_k / experts), for `unstable_windows` windows
    # in a row after the first 20% of the run (train/health.py)
    flip_rate_warn: float = 0.6
    unstable_windows: int = 3


@dataclass
class CheckpointSection:
    every: int = 100  # optimizer steps; 0: only at the end (and on interruption)
    keep_last: int = 3


@dataclass
class ParallelSection:
    """Degrees of a run launched by `torchrun --nproc-per-node N` (ignored by a single process)."""

    ep: int = 1  # expert parallelism: each MoE layer's routed experts split over this many ranks (divides N)
    dp_shard: int = -1  # ranks each non-expert parameter is sharded over (FSDP2); -1: all N; fewer: HSDP,
    # replicated over N / dp_shard groups
    # how long a collective may wait for the other ranks before the run fails (seconds): generous until the first
    # step is done (rendezvous, compilation, the first checkpoint load), short once training runs (torchtitan: 300
    # and 100)
    timeout_start_s: float = 300.0
    timeout_s: float = 100.0
    # warn when a rank's own work (waiting for input, its optimizer update) exceeds the other ranks' median by this
    # factor for `straggler_windows` logging windows in a row (parallel/watch.py); 0: no warning
    straggler_factor: float = 1.5
    straggler_windows: int = 3
    # every rank beats in the rendezvous store this often (seconds), with its step, so that after a failure a
    # survivor can name the rank that is gone or stuck (parallel/watch.py); 0: off
    heartbeat_s: float = 1.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    router: RouterSection = field(default_factory=RouterSection)
    distill: DistillSection = field(default_factory=DistillSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    health: HealthSection = field(default_factory=HealthSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise `ValueError` naming the key for values no run can use."""
        checks = [
            ("train.steps", self.train.steps >= 1), ("train.batch_size", self.train.batch_size >= 1),
            ("train.grad_accum", self.train.grad_accum >= 1), ("data.seq_len", self.data.seq_len >= 2),
            ("optim.lr", self.optim.lr > 0), ("optim.warmup_steps", self.optim.warmup_steps >= 0),
            ("optim.schedule", self.optim.schedule in ("cosine", "wsd", "constant")),
            ("optim.decay_fraction", 0 <= self.optim.decay_fraction <= 1),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1),
            ("optim.betas", len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas)),
            ("data.val_fraction", 0 <= self.data.val_fraction < 1), ("data.max_tiles", self.data.max_tiles >= 1),
            ("train.precision", self.train.precision in ("auto", "fp32", "bf16")),
            ("parallel.timeout_start_s", self.parallel.timeout_start_s > 0),
            ("parallel.timeout_s", self.parallel.timeout_s > 0),
            ("parallel.straggler_factor", self.parallel.straggler_factor == 0 or self.parallel.straggler_factor > 1),
            ("parallel.straggler_windows", self.parallel.straggler_windows >= 1),
            ("parallel.heartbeat_s", self.parallel.heartbeat_s >= 0),
            ("router.bias_update", self.router.bias_update in BIAS_RULES),
            ("router.bias_update_rate", self.router.bias_update_rate is None or self.router.bias_update_rate >= 0),
            ("router.bias_max_step", self.router.bias_update not in BIAS_RULES  # (reported above)
             or self.router.bias_max_step >= self.router.bias_rate),
            ("router.balance_loss_coef", self.router.balance_loss_coef >= 0),
            ("router.seq_balance_loss_coef", self.router.seq_balance_loss_coef >= 0),
            ("router.selection_noise", self.router.selection_noise >= 0),
            ("log.every", self.log.every >= 1), ("log.health_every", self.log.health_every >= 1),
            ("checkpoint.keep_last", self.checkpoint.keep_last >= 1),
            ("health.collapse_share", 0 < self.health.collapse_share <= 1),
            ("health.dead_windows", self.health.dead_windows >= 1),
            ("health.flip_rate_warn", 0 <= self.health.flip_rate_warn <= 1),
            ("health.unstable_windows", self.health.unstable_windows >= 1),
            ("parallel.ep", self.parallel.ep >= 1),
            ("distill.tokenizer", self.distill.tokenizer in ("teacher", "own")),
            ("distill.cross_method", self.distill.cross_method in ("aligned", "uld", "hybrid")),
            ("distill.uld_weight", self.distill.uld_weight >= 0),
            ("distill.vocab_match", self.distill.vocab_match in ("exact", "prefix", "marginal")),
            ("distill.teacher_dtype", self.distill.teacher_dtype in ("auto", "fp32", "bf16")),
            ("distill.on_policy", 0 <= self.distill.on_policy <= 1),
            ("distill.on_policy_start", 0 <= self.distill.on_policy_start < 1),
            ("distill.on_policy_loss", self.distill.on_policy_loss in DIVERGENCES),
            ("distill.on_policy_prefix", self.distill.on_policy_prefix >= 1),
            ("distill.on_policy_rows", self.distill.on_policy_rows >= 0),
            ("distill.on_policy_tokens", self.distill.on_policy_tokens >= 1),
            ("distill.on_policy_temperature", self.distill.on_policy_temperature >= 0),
            ("parallel.dp_shard", self.parallel.dp_shard == -1 or self.parallel.dp_shard >= 1),
        ]
        choices = {"router.bias_update": f" (one of {', '.join(BIAS_RULES)})",
                   "router.bias_max_step": " (at least the bias rate, router.bias_update_rate)",
                   "distill.tokenizer": " (teacher or own)", "distill.cross_method": " (aligned, uld or hybrid)",
                   "distill.vocab_match": " (exact, prefix or marginal)",
                   "distill.teacher_dtype": " (auto, fp32 or bf16)", "distill.on_policy": " (a share in [0, 1])",
                   "distill.on_policy_loss": f" (one of {', '.join(DIVERGENCES)})"}
        for key, ok in checks:
            if not ok:
                raise ValueError(f"{key}={self.get(key)!r} is not a valid value{choices.get(key, '')}")
        return self

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def valid_keys() -> list[str]:
    """Every dotted key a config file or override may set, e.g. 'optim.lr'."""
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def _unknown(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}unknown key {key!r}{hint}")


def _field_type(section: type, name: str) -> tuple[Any, bool]:
    """(the field's type without None, whether None is allowed)."""
    tp = typing.get_type_hints(section)[name]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in args if a is not type(None)), type(None) in args
    return tp, False


def _parse(key: str, text: str, tp: Any) -> Any:
    """A command-line string as a value of type `tp` (bool, int, float, str or list of those)."""
    origin = typing.get_origin(tp) or tp
    try:
        if origin is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if origin is list:
            items = json.loads(text) if text.startswith("[") else [t.strip() for t in text.split(",") if t.strip()]
            (item_tp,) = typing.get_args(tp)
            return [_parse(key, str(i), item_tp) for i in items]
        return origin(text)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"{key}={text!r}: expected {getattr(tp, '__name__', str(tp))}") from None


def _coerce(key: str, value: Any, section: type, name: str) -> Any:
    """Check a value (from TOML, or a string from the command line) against the field's type."""
    tp, optional = _field_type(section, name)
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    if isinstance(value, str) and tp is not str:
        value = _parse(key, value, tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: may not be empty")
    origin = typing.get_origin(tp) or tp
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (origin is bool) or not isinstance(value, origin):
        raise ValueError(f"{key}={value!r}: expected {getattr(tp, '__name__', str(tp))}")
    return value


def apply(cfg: TrainConfig, updates: dict[str, Any], where: str = "") -> TrainConfig:
    """Set dotted keys ({'optim.lr': 3e-4}) on a config, with type checks."""
    sections = _sections()
    for key, value in updates.items():
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            raise _unknown(key, where)
        setattr(getattr(cfg, section), name, _coerce(key, value, sections[section], name))
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as flat dotted keys; unknown sections and keys raise, naming the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None
    flat: dict[str, Any] = {}
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise _unknown(section, f"{path}: ")
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    return flat


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--optim.lr=3e-4', '--train.steps', '100'] -> {'optim.lr': '3e-4', 'train.steps': '100'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {a!r}; overrides look like --section.key=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(args):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"{a}: missing a value")
        out[k] = v
        i += 1
    return out


def build_config(config_file: str | None = None, overrides: list[str] | None = None,
                 updates: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file, then the command-line overrides (["--optim.lr=3e-4"]), then `updates`
    (typed values by dotted key, for programs: {"optim.lr": 3e-4}); validated."""
    cfg = TrainConfig()
    if config_file:
        apply(cfg, load_toml(config_file), where=f"{config_file}: ")
    apply(cfg, parse_overrides(overrides or []))
    apply(cfg, updates or {})
    return cfg.validate()
