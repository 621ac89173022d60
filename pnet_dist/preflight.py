"""Pre-flight: what a launcher can check about a job before any worker starts, in seconds.

Owns the checks that turn a mistake no restart can fix into one clear ValueError on the driver,
before Ray starts a worker group (which would otherwise fail, and be restarted up to
scaling.max_failures times, on every rank):

- paths: a relative local path under `ray job submit --working-dir` (or a runtime env with a
  working_dir) would point into Ray's temporary copy of that folder; a local path on a cluster of
  several machines exists on one of them only (unless scaling.shared_filesystem says it is a
  filesystem every node mounts);
- the model: model.name builds on the meta device with model.kwargs and the dataset's
  num_classes / vocab_size (no memory, no weights), and its DeepSpeed settings are supported
  (config.check_moe_deepspeed for models with MoE layers); text: data.seq_len fits the model;
- the data: every data URI holds a dataset written by our converters, of data.kind (image vs
  text), with the job's seq_len; the model's vocabulary covers the dataset's (so every token id
  fits, as the converter writes ids of that vocabulary);
- the run folder: checkpoint.uri (and an s3:// metrics.logdir) is writable, and a run that already
  has checkpoints was trained with the same model.name;
- S3: every bucket named answers to this machine's credentials within seconds
  (storage.check_s3_access), before anything is retried for minutes.

Nothing here writes to disk (an S3 write probe is deleted again) and nothing imports Ray or
DeepSpeed: pnet_dist.launch calls `check_job` (and `check_paths` once it knows the cluster).
"""
from __future__ import annotations

import os
import re

import yaml

from pnet_dist import storage
from pnet_dist.config import JobConfig, check_moe_deepspeed

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SYNTHETIC = "synthetic:"

# Config fields that may hold a local path (others may be s3:// or another scheme).
LOCAL_PATH_FIELDS = (
    ("data", "train_uri"), ("data", "eval_uri"), ("data", "cache_dir"),
    ("checkpoint", "uri"), ("metrics", "logdir"), ("train", "init_from"),
)
# Of those, the ones every node must see the same (cache_dir is a per-node cache).
_SHARED_PATH_FIELDS = tuple(field for field in LOCAL_PATH_FIELDS if field != ("data", "cache_dir"))


def is_local_path(value: str | None) -> bool:
    return value is not None and not _URI_SCHEME.match(value)


def local_path_fields(cfg: JobConfig, fields=LOCAL_PATH_FIELDS) -> list[tuple[str, str]]:
    """[(dotted key, value)] of the fields that hold a local path."""
    found = []
    for section, name in fields:
        value = getattr(getattr(cfg, section), name)
        if is_local_path(value):
            found.append((f"{section}.{name}", value))
    return found


# -- paths ---------------------------------------------------------------------------------------
def check_relative_paths(cfg: JobConfig, source: str, working_dir_copy: str | None) -> None:
    """Under a Ray working_dir the driver runs in Ray's temporary copy of it: a relative local path
    would read and write inside that copy (checkpoints vanish with the Ray session)."""
    if working_dir_copy is None:
        return
    relative = [(key, value) for key, value in local_path_fields(cfg) if not os.path.isabs(os.path.expanduser(value))]
    if relative:
        key, value = relative[0]
        raise ValueError(
            f"{source}: {key}={value} is a relative local path, but this job runs in Ray's temporary copy of its "
            f"working_dir ({working_dir_copy}), where it would be read and written and then lost. Give an absolute "
            f"path or an s3:// URI, or submit without --working-dir / --runtime-env to a head started in the "
            f"folder the paths are relative to (see README, 'Running on a cluster')")


def check_paths(cfg: JobConfig, source: str, single_machine: bool) -> None:
    """Local paths on a cluster of several machines exist on one machine only."""
    if single_machine or cfg.scaling.shared_filesystem:
        return
    local = local_path_fields(cfg, _SHARED_PATH_FIELDS)
    if local:
        key, value = local[0]
        raise ValueError(
            f"{source}: {key}={value} is a local path, but the job's workers run on other machines of the cluster, "
            f"where it does not exist. Use s3:// URIs, or, if the path is on a filesystem every node mounts at the "
            f"same place (NFS, EFS, FSx), set scaling.shared_filesystem=true")


# -- the job --------------------------------------------------------------------------------------
def check_job(cfg: JobConfig, source: str) -> None:
    """Every check of the module docstring that needs no cluster; raises ValueError naming the key."""
    from pnet_dist.models import list_models
    if cfg.model.name not in list_models():
        raise ValueError(f"{source}: model.name: unknown model {cfg.model.name!r}; registered models: "
                         f"{', '.join(list_models())}")
    _check_s3_buckets(cfg)
    train_info = _check_datasets(cfg, source)
    _check_model(cfg, source, train_info)
    _check_run_folder(cfg, source)


def _check_s3_buckets(cfg: JobConfig) -> None:
    """Each bucket once, writable where the run writes (checkpoint.uri, metrics.logdir)."""
    reads = [cfg.data.train_uri, cfg.data.eval_uri, cfg.train.init_from]
    writes = [cfg.checkpoint.uri, cfg.metrics.logdir]
    checked: dict[str, bool] = {}
    for uri, write in [(u, True) for u in writes] + [(u, False) for u in reads]:
        if uri is None or not storage.is_s3(uri):
            continue
        bucket, _ = storage.split_s3(uri)
        if checked.get(bucket) is True or (checked.get(bucket) is False and not write):
            continue
        storage.check_s3_access(storage.join(cfg.run_uri) if uri == cfg.checkpoint.uri else uri, write=write)
        checked[bucket] = write


def _check_datasets(cfg: JobConfig, source: str) -> dict:
    """dataset.json of every data URI, checked against data.kind and data.seq_len; returns the
    training set's (empty for synthetic data)."""
    from pnet_dist.data.shards import INDEX, dataset_info

    infos = {}
    for key, uri in (("data.train_uri", cfg.data.train_uri), ("data.eval_uri", cfg.data.eval_uri)):
        if uri is None or uri.startswith(SYNTHETIC):
            infos[key] = {}
            continue
        try:
            info = dataset_info(uri)
        except ValueError as exc:
            raise ValueError(f"{source}: {key}: {exc}") from None
        kind = info.get("kind")
        if kind != cfg.data.kind:
            raise ValueError(f"{source}: {key}={uri} holds a {kind!r} dataset (its dataset.json) but data.kind is "
                             f"{cfg.data.kind!r}; point {key} at a {cfg.data.kind} dataset or set data.kind={kind}")
        if not storage.open_storage(uri).exists(INDEX):
            raise ValueError(f"{source}: {key}={uri} has a dataset.json but no {INDEX}: its conversion did not "
                             f"finish; run the converter again on it")
        if kind == "text" and info.get("seq_len") != cfg.data.seq_len:
            raise ValueError(f"{source}: data.seq_len={cfg.data.seq_len} but {uri} was written with seq_len "
                             f"{info.get('seq_len')}; set data.seq_len={info.get('seq_len')} or convert the text again "
                             f"with tools/make_text_shards.py --seq-len {cfg.data.seq_len}")
        infos[key] = info
    return infos["data.train_uri"]


def _check_model(cfg: JobConfig, source: str, train_info: dict) -> None:
    """model.name and model.kwargs build on the meta device; MoE DeepSpeed settings; seq_len fits."""
    from pnet_dist.models import create_model
    from pnet_dist.models.moe import moe_layers
    from pnet_dist.tasks import build_model_kwargs

    try:
        kwargs = build_model_kwargs(cfg, train_info)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    try:
        model = create_model(cfg.model.name, device="meta", **kwargs)
    except (ValueError, TypeError) as exc:
        key = "model.name" if "unknown model" in str(exc) else "model.kwargs"
        raise ValueError(f"{source}: {key}: {exc}") from None
    if moe_layers(model):
        check_moe_deepspeed(cfg, source)
    if cfg.data.kind == "text":
        max_seq_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        if max_seq_len is not None and cfg.data.seq_len > max_seq_len:
            raise ValueError(f"{source}: data.seq_len={cfg.data.seq_len} exceeds the max_seq_len={max_seq_len} of "
                             f"{cfg.model.name}; lower data.seq_len or set model.kwargs.max_seq_len")


def _check_run_folder(cfg: JobConfig, source: str) -> None:
    """The run folder can be written, and a run with checkpoints resumes only with its own model."""
    uri = cfg.checkpoint.uri
    if not storage.is_s3(uri) and is_local_path(uri):
        _check_local_writable("checkpoint.uri", uri, source)
    if cfg.metrics.logdir and is_local_path(cfg.metrics.logdir):
        _check_local_writable("metrics.logdir", cfg.metrics.logdir, source)
    init_from = cfg.train.init_from
    if init_from and is_local_path(init_from) and not os.path.exists(os.path.expanduser(init_from)):
        raise ValueError(f"{source}: train.init_from={init_from} does not exist; give the folder "
                         "tools/export_checkpoint.py wrote")
    run = storage.open_storage(cfg.run_uri)
    if not run.list("ckpt"):
        return
    try:
        recorded = yaml.safe_load(run.get_bytes("config.yaml")) or {}
    except FileNotFoundError:
        return
    recorded_model = (recorded.get("model") or {}).get("name")
    if recorded_model and recorded_model != cfg.model.name:
        raise ValueError(f"{source}: model.name={cfg.model.name} but the run {cfg.run_uri} holds checkpoints of "
                         f"model.name={recorded_model} (its config.yaml); resume it with model.name={recorded_model}, "
                         f"or start a new run with another run_name")


def _check_local_writable(key: str, path: str, source: str) -> None:
    """The nearest existing folder of `path` exists as a folder and may be written (nothing is created)."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{source}: {key}={path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{source}: {key}={path}: cannot write into {existing}; choose a writable folder")
