"""Job configuration: one YAML file per run, loaded into typed, strict dataclasses.

Owns the schema (JobConfig and its sections), loading with `key=value` overrides, validation of
types and cross-field rules, and writing the resolved config into the run folder. Every error is
a ValueError that names the file (or the override) and the dotted key, and says what to do.

Overrides are "a.b=value" with the value parsed as a YAML scalar ("optim.lr=3e-4",
"deepspeed.raw.zero_optimization.overlap_comm=true"). Keys under dict-typed fields (model.kwargs,
deepspeed.raw) are free-form; everywhere else an unknown key is an error.

Credentials never travel through a config: a URI with user info (s3://KEY:SECRET@bucket) in any
key that takes a URI or path, and a credential-looking key (secret, password, token, access key,
...) under model.kwargs or deepspeed.raw -- both copied verbatim into config.yaml and every
checkpoint -- are refused, naming the key and never repeating the value.

Only this module, storage and log sit below it: it imports no torch, deepspeed or ray.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pnet_dist import storage

_MISSING_REQUIRED = "<required>"
_ABSENT = object()


@dataclass
class ModelConfig:
    name: str = _MISSING_REQUIRED
    kwargs: dict[str, Any] = field(default_factory=dict)   # passed to create_model


@dataclass
class DataConfig:
    kind: Literal["image", "text"] = "image"
    format: Literal["mds", "ffcv"] = "mds"     # images: MDS shards (streaming) or an ffcv dataset (ffcv_path.py)
    train_uri: str = _MISSING_REQUIRED         # local path, s3://, or synthetic: (see tasks.py)
    eval_uri: Optional[str] = None
    batch_size: int = 32                       # per rank micro-batch
    eval_batch_size: Optional[int] = None      # default: batch_size
    num_workers: int = 1
    image_size: int = 224
    crop_pct: float = 0.875
    randaugment_ops: int = 2                   # 0 = off
    randaugment_magnitude: int = 9             # bin in [0, 30]
    hflip: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.1
    seq_len: int = 2048
    shuffle: bool = True
    shuffle_seed: int = 42
    num_canonical_nodes: Optional[int] = None
    cache_dir: Optional[str] = None
    # JPEG decode: loader workers (cpu) or the GPU (cuda, nvJPEG); auto: cuda where the rank trains on a
    # GPU. cpu by default until the GPU path has been measured on a GPU (README: Known limitations).
    decode_device: Literal["auto", "cpu", "cuda"] = "cpu"


@dataclass
class OptimConfig:
    lr: float = 1e-3                           # peak lr (after warm-up)
    min_lr: float = 1e-5                       # end of the cosine
    weight_decay: float = 0.05                 # never applied to norms and biases
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: Optional[float] = None        # layer-wise lr decay for finetuning, e.g. 0.5
    warmup_steps: int = 0
    grad_clip: float = 1.0                     # 0 = no clipping


@dataclass
class TrainConfig:
    max_steps: int = 1000                      # optimizer steps
    eval_every_steps: int = 0                  # 0 = evaluate only at the end (if eval_uri is set)
    eval_max_samples: Optional[int] = None     # the first N eval samples (all ranks together); None = all
    log_every_steps: int = 10                  # console log line
    seed: int = 0
    ema_decay: Optional[float] = None          # weight EMA (vision only), e.g. 0.9998
    max_nonfinite_in_row: int = 10             # reload the last checkpoint after this many skipped steps
    moe_aux_coef: float = 0.01                 # Switch load-balancing loss coefficient
    init_from: Optional[str] = None            # exported checkpoint to start from (finetuning)
    watch_spot_interruption: bool = False      # poll the EC2 metadata service for a spot notice
    grad_checkpointing: bool = False           # activation checkpointing (per stage / decoder block)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2        # 0: data parallel, optimizer state whole on every rank
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_accum_steps: int = 1
    offload_optimizer: bool = False
    ep_size: int = 1                           # expert-parallel ranks (MoE language models)
    raw: dict[str, Any] = field(default_factory=dict)   # merged last into the ds_config


@dataclass
class CheckpointConfig:
    uri: str = "runs"                          # local dir or s3://bucket/prefix; run lives in uri/run_name
    every_steps: int = 1000
    keep_last: int = 3
    async_upload: bool = True
    upload_timeout_s: float = 600.0


@dataclass
class MetricsConfig:
    logdir: Optional[str] = None               # default <checkpoint.uri>/<run_name>/tb
    log_every_steps: int = 10                  # TensorBoard scalars
    peak_tflops_per_rank: Optional[float] = None   # for MFU; None = known GPU table, no MFU on CPU
    sync_every_s: float = 60.0                 # upload cadence of event files to an s3:// logdir


@dataclass
class ScalingConfig:
    num_workers: int = 1                       # Ray workers = ranks
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0                      # worker-group restarts after a failure; -1 = without limit
    ray_address: Optional[str] = None
    # True when the job's local paths (data, checkpoint.uri, metrics.logdir) are on a filesystem
    # that every node mounts at the same path (NFS, EFS, FSx): then a multi-node cluster may use them.
    shared_filesystem: bool = False


@dataclass
class JobConfig:
    run_name: str = _MISSING_REQUIRED
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    @property
    def run_uri(self) -> str:
        """Where everything of this run lives: checkpoints, resolved config, (default) TensorBoard."""
        return storage.join(self.checkpoint.uri, self.run_name)


# ds_config keys the typed sections own; setting them in deepspeed.raw would silently disagree.
_RAW_OWNED = {
    "train_batch_size": "data.batch_size and deepspeed.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "deepspeed.grad_accum_steps",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "the optim section",
    "scheduler": "the optim section",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
}


# Keys under the free-form mappings that name a credential: any of these words in the key, or a
# token that authenticates ("hf_token", "auth_token", a bare "token"; not "pad_token_id").
_CREDENTIAL_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials",
                     "apikey", "accesskey", "privatekey"}
_CREDENTIAL_PAIRS = {("access", "key"), ("api", "key"), ("private", "key"), ("secret", "key"),
                     ("session", "token"), ("access", "token"), ("auth", "token"), ("api", "token"),
                     ("bearer", "token"), ("hf", "token"), ("refresh", "token"), ("id", "token")}


def credential_key(key: str) -> bool:
    """True if a mapping key names a credential (see _CREDENTIAL_WORDS / _CREDENTIAL_PAIRS)."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", str(key))]
    return (any(w in _CREDENTIAL_WORDS for w in words) or words == ["token"]
            or any(pair in _CREDENTIAL_PAIRS for pair in itertools.pairwise(words)))


def _credential_keys(node: Any, where: str) -> list[str]:
    """Dotted paths of every credential-looking key in a nested mapping (lists walked too)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{where}.{key}"
            if credential_key(key):
                found.append(dotted)
            found += _credential_keys(value, dotted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _credential_keys(value, f"{where}[{i}]")
    return found


def _uri_keys(cfg: JobConfig) -> dict[str, str | None]:
    """Every config key that holds a URI or a path, with its value."""
    return {"checkpoint.uri": cfg.checkpoint.uri, "data.train_uri": cfg.data.train_uri,
            "data.eval_uri": cfg.data.eval_uri, "data.cache_dir": cfg.data.cache_dir,
            "metrics.logdir": cfg.metrics.logdir, "train.init_from": cfg.train.init_from,
            "scaling.ray_address": cfg.scaling.ray_address}


# -- loading ---------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """Read the job YAML at `path`, apply "a.b=value" overrides, and return the validated config."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the job file: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(yaml_error_line(path, exc)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, path)
    return config_from_dict(raw, source=path)


def yaml_error_line(path: str, exc: yaml.YAMLError) -> str:
    """'FILE:LINE:COLUMN: what is wrong' for a YAML syntax error (lines and columns from 1)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = " ".join(part for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
    if "'\\t'" in problem:  # PyYAML names the character as '\t'
        problem += " (indent with spaces; YAML does not allow tabs there)"
    return f"{where}: not valid YAML: {problem or exc}"


def apply_override(raw: dict, item: str, source: str = "<overrides>") -> None:
    """Set one "a.b.c=value" override in the raw (not yet typed) config dict, in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{source}: override {item!r} is not key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: override {item!r}: value is not a YAML scalar: {exc}") from exc
    if isinstance(value, (dict, list)) and not text.strip().startswith(("{", "[")):
        value = text.strip()  # "data.train_uri=synthetic:" is a string, not a one-key mapping
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{source}: override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict, source: str = "<dict>") -> JobConfig:
    """Typed, validated JobConfig from a plain dict (as read from YAML)."""
    cfg = _build(JobConfig, raw, source, "")
    _check_required(cfg, source)
    _refuse_credentials(cfg, source)  # before anything derives a URI from them (metrics.logdir)
    _resolve_defaults(cfg)
    validate(cfg, source)
    return cfg


def config_to_dict(cfg: JobConfig) -> dict:
    """Plain dict (YAML-safe: tuples become lists) of a config."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_resolved(cfg: JobConfig, uri: str | None = None) -> str:
    """Write the resolved YAML (default <run_uri>/config.yaml, local or s3://); returns its URI."""
    uri = uri or storage.join(cfg.run_uri, "config.yaml")
    parent, _, name = uri.rstrip("/").rpartition("/")
    storage.open_storage(parent or ".").put_bytes(dump_config(cfg).encode(), name)
    return uri


# -- typing ----------------------------------------------------------------------------------
def _build(cls, raw: Any, source: str, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {where or 'top level'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ValueError(f"{source}: unknown key {key!r}; allowed in {where or 'the top level'}: "
                         f"{', '.join(sorted(names))}")
    values = {name: _convert(raw[name], hints[name], source, f"{where}.{name}" if where else name)
              for name in raw}
    return cls(**values)


def _convert(value: Any, hint: Any, source: str, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, source, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, source, where)
    if origin is Literal:
        if value not in args or type(value) is bool:
            raise ValueError(f"{source}: {where}: must be one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {where}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: {where}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it since that is how people write lr.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {where}: expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{source}: {where}: expected a string, got {_show(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {where}: expected a mapping, got {_show(value)}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{source}: {where}: expected a list of {len(args)} values, got {_show(value)}")
        return tuple(_convert(v, a, source, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise AssertionError(f"config type {hint!r} of {where} is not handled")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_required(cfg: JobConfig, source: str) -> None:
    for key, value in (("run_name", cfg.run_name), ("model.name", cfg.model.name),
                       ("data.train_uri", cfg.data.train_uri)):
        if value == _MISSING_REQUIRED:
            raise ValueError(f"{source}: {key} is required")


def _refuse_credentials(cfg: JobConfig, source: str) -> None:
    for key, uri in _uri_keys(cfg).items():
        if uri is not None:
            storage.refuse_credentials(uri, f"{source}: {key}")
    for where, mapping in (("model.kwargs", cfg.model.kwargs), ("deepspeed.raw", cfg.deepspeed.raw)):
        found = _credential_keys(mapping, where)
        if found:
            raise ValueError(f"{source}: {found[0]}: looks like a credential; remove it: {where} is copied verbatim "
                             "into config.yaml and every checkpoint. Give credentials to the processes through "
                             "their environment (the AWS chain: environment variables, ~/.aws, the instance role)")


def _resolve_defaults(cfg: JobConfig) -> None:
    if cfg.metrics.logdir is None:
        cfg.metrics.logdir = storage.join(cfg.run_uri, "tb")
    if cfg.data.eval_batch_size is None:
        cfg.data.eval_batch_size = cfg.data.batch_size


# -- cross-field rules -----------------------------------------------------------------------
def validate(cfg: JobConfig, source: str = "<config>") -> None:
    """Range and cross-field rules; raises ValueError naming the key and the fix."""
    def fail(key: str, message: str) -> None:
        raise ValueError(f"{source}: {key}: {message}")

    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name.strip() != cfg.run_name:
        fail("run_name", f"must be a non-empty name without '/' or surrounding spaces, got {cfg.run_name!r}")
    positive = {
        "data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size,
        "data.image_size": cfg.data.image_size, "data.seq_len": cfg.data.seq_len,
        "train.max_steps": cfg.train.max_steps, "train.log_every_steps": cfg.train.log_every_steps,
        "train.max_nonfinite_in_row": cfg.train.max_nonfinite_in_row,
        "deepspeed.grad_accum_steps": cfg.deepspeed.grad_accum_steps, "deepspeed.ep_size": cfg.deepspeed.ep_size,
        "checkpoint.every_steps": cfg.checkpoint.every_steps, "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "metrics.log_every_steps": cfg.metrics.log_every_steps, "scaling.num_workers": cfg.scaling.num_workers,
        "scaling.cpus_per_worker": cfg.scaling.cpus_per_worker,
        "checkpoint.upload_timeout_s": cfg.checkpoint.upload_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            fail(key, f"must be > 0, got {value}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers, "data.randaugment_ops": cfg.data.randaugment_ops,
        "data.mixup_alpha": cfg.data.mixup_alpha, "data.cutmix_alpha": cfg.data.cutmix_alpha,
        "optim.weight_decay": cfg.optim.weight_decay, "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip, "optim.min_lr": cfg.optim.min_lr,
        "train.eval_every_steps": cfg.train.eval_every_steps, "train.moe_aux_coef": cfg.train.moe_aux_coef,
    }
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    for key, value in (("data.hflip", cfg.data.hflip), ("data.label_smoothing", cfg.data.label_smoothing)):
        if not 0.0 <= value <= 1.0:
            fail(key, f"must be in [0, 1], got {value}")
    if cfg.scaling.max_failures < -1:
        fail("scaling.max_failures", f"must be >= 0, or -1 to restart without limit, got {cfg.scaling.max_failures}")
    if not 0 <= cfg.data.randaugment_magnitude <= 30:
        fail("data.randaugment_magnitude", f"must be a magnitude bin in [0, 30] (9 is the usual), "
             f"got {cfg.data.randaugment_magnitude}")
    if not 0.0 < cfg.data.crop_pct <= 1.0:
        fail("data.crop_pct", f"must be in (0, 1], got {cfg.data.crop_pct}")
    if cfg.data.format == "ffcv":
        if cfg.data.kind != "image":
            fail("data.format", "ffcv reads image datasets only; use data.format=mds for text")
        if cfg.data.train_uri.startswith("synthetic:"):
            fail("data.format", "synthetic: data is made in the training process; data.format=ffcv reads a "
                 "dataset written by tools/make_ffcv_beton.py")
        if cfg.data.randaugment_ops:
            fail("data.randaugment_ops", f"is {cfg.data.randaugment_ops}, but ffcv has no RandAugment: set "
                 "data.randaugment_ops=0 to train through ffcv, or data.format=mds to keep RandAugment")

    optim = cfg.optim
    if not (optim.lr > 0 and math.isfinite(optim.lr)):
        fail("optim.lr", f"must be a positive number, got {optim.lr}")
    if optim.min_lr > optim.lr:
        fail("optim.min_lr", f"({optim.min_lr}) is above optim.lr ({optim.lr}); the cosine decays from lr to min_lr")
    if optim.warmup_steps >= cfg.train.max_steps:
        fail("optim.warmup_steps", f"({optim.warmup_steps}) must be below train.max_steps ({cfg.train.max_steps})")
    if not all(0.0 <= b < 1.0 for b in optim.betas):
        fail("optim.betas", f"each beta must be in [0, 1), got {list(optim.betas)}")
    if optim.eps <= 0:
        fail("optim.eps", f"must be > 0, got {optim.eps}")
    if optim.layer_decay is not None and not 0.0 < optim.layer_decay <= 1.0:
        fail("optim.layer_decay", f"must be in (0, 1] (e.g. 0.5 for finetuning), got {optim.layer_decay}")

    train = cfg.train
    if train.eval_every_steps > 0 and cfg.data.eval_uri is None:
        fail("train.eval_every_steps", "is set but data.eval_uri is not; set data.eval_uri or eval_every_steps=0")
    if train.eval_max_samples is not None and train.eval_max_samples <= 0:
        fail("train.eval_max_samples", f"must be > 0 or null, got {train.eval_max_samples}")
    if train.ema_decay is not None:
        if not 0.0 < train.ema_decay < 1.0:
            fail("train.ema_decay", f"must be in (0, 1), e.g. 0.9998, got {train.ema_decay}")
        if cfg.data.kind != "image":
            fail("train.ema_decay", "weight EMA is for vision runs (data.kind=image); remove it for text")
        if cfg.deepspeed.zero_stage == 3:
            fail("train.ema_decay", "the EMA keeps full weights on every rank, which ZeRO-3 partitions; "
                 "use deepspeed.zero_stage 1 or 2 for vision models with EMA")

    ds = cfg.deepspeed
    if ds.zero_stage == 0:
        if ds.offload_optimizer:
            fail("deepspeed.offload_optimizer", "true needs ZeRO (zero_stage 1 or 2): stage 0 keeps the optimizer "
                 "on the GPU; remove it or set deepspeed.zero_stage")
        if ds.precision == "fp16" or (ds.precision == "bf16" and cfg.data.kind == "text"):
            fail("deepspeed.zero_stage", f"0 takes fp32 weights (precision fp32, or bf16 for vision models, which "
                 f"train under autocast); precision {ds.precision} here: use zero_stage 1 or 2, or precision fp32")
        if ds.ep_size > 1:
            fail("deepspeed.zero_stage", "0 does not combine with expert parallelism (deepspeed.ep_size > 1): "
                 "use zero_stage 1 or 2")
    if ds.precision == "fp16" and not cfg.scaling.use_gpu:
        fail("deepspeed.precision", "fp16 needs a GPU (scaling.use_gpu=true); use bf16 or fp32 on CPU")
    if ds.ep_size > 1:
        if cfg.data.kind != "text":
            fail("deepspeed.ep_size", "expert parallelism is for MoE language models (data.kind=text)")
        if ds.zero_stage == 3:
            fail("deepspeed.ep_size", "expert parallelism does not combine with ZeRO-3; use zero_stage 1 or 2")
        num_experts = cfg.model.kwargs.get("num_experts")
        if isinstance(num_experts, int) and num_experts % ds.ep_size:
            fail("deepspeed.ep_size", f"({ds.ep_size}) must divide model.kwargs.num_experts ({num_experts})")
        if cfg.scaling.num_workers % ds.ep_size and cfg.scaling.num_workers > 1:
            fail("deepspeed.ep_size", f"({ds.ep_size}) must divide scaling.num_workers ({cfg.scaling.num_workers})")
    for dotted, owner in _RAW_OWNED.items():
        node: Any = ds.raw
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            fail(f"deepspeed.raw.{dotted}", f"is set by {owner}; set it there instead")

    if cfg.data.kind == "text" and "aux_loss_coef" in cfg.model.kwargs \
            and cfg.model.kwargs["aux_loss_coef"] != train.moe_aux_coef:
        fail("model.kwargs.aux_loss_coef", f"({cfg.model.kwargs['aux_loss_coef']}) contradicts train.moe_aux_coef "
             f"({train.moe_aux_coef}); set only train.moe_aux_coef")


# -- the DeepSpeed settings a mixture-of-experts model trains under --------------------------
def check_moe_deepspeed(cfg: JobConfig, source: str = "<config>") -> None:
    """THE place that decides which DeepSpeed settings a model with MoE projections trains under,
    at any deepspeed.ep_size (1 included): ZeRO stage 1 or 2 (or 0, without expert parallelism:
    then nothing is partitioned and DeepSpeed's own format holds every expert), fp32 or bf16, no
    optimizer offload, DeepSpeed's default reduce_scatter and contiguous_gradients.

    Why: DeepSpeed refuses expert-parallel parameters under ZeRO-3; our topology-independent MoE
    checkpoint (pnet_dist.moe_deepspeed) reads ZeRO-1/2 partitions and carries neither the fp16
    loss scaler nor offloaded optimizer state; DeepSpeed's MoE gradient reduction needs
    reduce_scatter and (ZeRO-2) contiguous gradients. Whether a model has MoE layers is the
    registry's knowledge, not the config's, so the launcher's pre-flight and the engine call this
    once they have built the model (the pre-flight on the meta device).
    """
    ds = cfg.deepspeed

    def fail(key: str, message: str) -> None:
        raise ValueError(f"{source}: {key}: {message} (model {cfg.model.name} has mixture-of-experts layers; "
                         "supported for MoE: zero_stage 1 or 2 (0 without expert parallelism), precision fp32 or bf16, "
                         "no offload_optimizer)")

    if ds.zero_stage == 3:
        fail("deepspeed.zero_stage", "3 is not supported; use 2 (and deepspeed.ep_size > 1 to shard the experts, "
             "which hold most of the parameters)")
    if ds.precision == "fp16":
        fail("deepspeed.precision", "fp16 is not supported (its loss-scaler state is not checkpointed); use bf16")
    if ds.offload_optimizer:
        fail("deepspeed.offload_optimizer", "true is not supported; remove it (deepspeed.ep_size > 1 divides "
             "the expert memory instead)")
    zero = ds.raw.get("zero_optimization", {}) if isinstance(ds.raw.get("zero_optimization"), dict) else {}
    if zero.get("reduce_scatter", True) is False:
        fail("deepspeed.raw.zero_optimization.reduce_scatter", "false is not supported by DeepSpeed's MoE "
             "gradient reduction; remove the key")
    if ds.zero_stage == 2 and zero.get("contiguous_gradients", True) is False:
        fail("deepspeed.raw.zero_optimization.contiguous_gradients", "false is not supported by DeepSpeed's "
             "ZeRO-2 MoE path; remove the key")
