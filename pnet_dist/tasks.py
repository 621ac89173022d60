"""Per-family task objects: how a batch becomes a loss and metrics, for the one training loop.

A task owns what differs between image classification and causal language modelling: building
the model (filling num_classes / vocab_size from the dataset, the MoE aux coefficient), building
the loaders, the training loss of one micro-batch, the sums an eval batch contributes, the
summary of those sums, and the counted training FLOPs per sample (for MFU).

  ImageClassificationTask: the device part of the image pipeline (pnet_dist.data.device_pipeline:
      decode where data.decode_device says, RandAugment, normalization), mixup/cutmix + label
      smoothing as soft targets from pnet_dist.data.mixup_cutmix (its generator is seeded by the
      loop per micro-batch, see train.micro_batch_seed), soft-target cross-entropy; eval loss,
      top-1, top-5.
      FLOPs: counted MACs (pnet_dist.models.counting) x 2 x 3 (forward + backward).
  CausalLMTask: next-token cross-entropy + the model's MoE aux loss (already scaled by
      train.moe_aux_coef, passed to the model as aux_loss_coef); eval loss and perplexity.
      FLOPs: 6 x active parameters x tokens (embedding lookups excluded; top-1 MoE: one expert).

Data URIs: a dataset written by pnet_dist.data (local folder or s3://; images as MDS shards read
by the streaming loaders, or with data.format=ffcv an ffcv dataset read by ffcv_path), or "synthetic:" --
deterministic random batches made in the training process (no I/O), for benchmarks and smoke
runs: sample i is a pure function of (data.shuffle_seed, i), and the loader position counts
global samples, so a resume on another number of ranks continues the same sample stream.
Eval sets (build_loaders' second value) yield global batches by index, the same at any world
size (pnet_dist.data.evaluation; SyntheticEvalSet).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pnet_dist import dist
from pnet_dist.config import JobConfig
from pnet_dist.models import create_model

SYNTHETIC = "synthetic:"


def build_task(cfg: JobConfig) -> "ImageClassificationTask | CausalLMTask":
    return ImageClassificationTask(cfg) if cfg.data.kind == "image" else CausalLMTask(cfg)


def build_model_kwargs(cfg: JobConfig, dataset_info: dict) -> dict:
    """create_model's kwargs for the job: model.kwargs with the training dataset's num_classes
    (images) or vocab_size (text) filled in where the job does not set it, and, for text, the MoE
    aux coefficient. A vocabulary may exceed the dataset's (padded for speed); nothing else may
    contradict it. Used by the tasks and by the launcher's pre-flight alike."""
    kwargs = dict(cfg.model.kwargs)
    key, may_exceed = ("num_classes", False) if cfg.data.kind == "image" else ("vocab_size", True)
    from_dataset = dataset_info.get(key)
    if from_dataset is not None:
        given = kwargs.setdefault(key, from_dataset)
        if isinstance(given, bool) or not isinstance(given, int):
            raise ValueError(f"model.kwargs.{key}={given!r} must be an integer (the dataset {cfg.data.train_uri} "
                             f"has {key}={from_dataset}); remove model.kwargs.{key} or fix it")
        if given < from_dataset or (given != from_dataset and not may_exceed):
            raise ValueError(f"model.kwargs.{key}={given} but the dataset {cfg.data.train_uri} has "
                             f"{key}={from_dataset}; remove model.kwargs.{key} or fix it")
    if cfg.data.kind == "text":
        kwargs["aux_loss_coef"] = cfg.train.moe_aux_coef
    return kwargs


def input_dtype(model: nn.Module) -> torch.dtype:
    """Images go in at the weights' dtype: bf16 weights take bf16 images, fp32 weights (fp32, or
    bf16 autocast) fp32 ones."""
    return next(model.parameters()).dtype


def soft_target_cross_entropy(logits_BK: torch.Tensor, targets_BK: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k (mixup/cutmix/label smoothing)."""
    return torch.sum(-targets_BK * F.log_softmax(logits_BK.float(), dim=-1), dim=-1).mean()


class _Task:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.device = dist.device()
        self.synthetic = cfg.data.train_uri.startswith(SYNTHETIC)

    def _dataset_info(self) -> dict:
        if self.synthetic:
            return {}
        from pnet_dist.data import dataset_info
        return dataset_info(self.cfg.data.train_uri)

    def count(self, batch) -> tuple[int, int]:
        """(samples, tokens) in a micro-batch."""
        return batch[0].shape[0], 0


class ImageClassificationTask(_Task):
    """Images -> logits; soft-target CE for training, CE + top-1/top-5 for eval."""

    eval_keys = ("loss_sum", "top1", "top5", "count")

    def __init__(self, cfg: JobConfig):
        super().__init__(cfg)
        from pnet_dist.data.device_pipeline import DeviceImagePipeline
        self.pixels = DeviceImagePipeline(self.device, image_size=cfg.data.image_size, crop_pct=cfg.data.crop_pct,
                                          randaugment_magnitude=cfg.data.randaugment_magnitude)

    def build_model(self) -> nn.Module:
        kwargs = build_model_kwargs(self.cfg, self._dataset_info())
        self.model_kwargs = kwargs  # recorded in the checkpoint manifest, for the export tool
        model = create_model(self.cfg.model.name, **kwargs)
        model.set_grad_checkpointing(self.cfg.train.grad_checkpointing)
        self.num_classes = model.num_classes
        self.flops_per_sample = 6.0 * _vision_macs(self.cfg.model.name, kwargs, self.cfg.data.image_size)
        return model

    def build_loaders(self) -> tuple[object, object | None]:
        data = self.cfg.data
        if self.synthetic:
            return _synthetic_loaders(self.cfg, _synthetic_image_sample(self.num_classes, data.image_size))
        if data.format == "ffcv":
            from pnet_dist.data.ffcv_path import build_ffcv_eval_set, build_ffcv_image_loader
            train_loader = build_ffcv_image_loader(
                data.train_uri, train=True, batch_size=data.batch_size, image_size=data.image_size,
                num_workers=data.num_workers, seed=data.shuffle_seed, crop_pct=data.crop_pct, hflip=data.hflip,
                shuffle=data.shuffle, cache_dir=data.cache_dir)
            eval_set = build_ffcv_eval_set(data.eval_uri, batch_size=data.eval_batch_size, image_size=data.image_size,
                                           crop_pct=data.crop_pct, num_workers=data.num_workers,
                                           cache_dir=data.cache_dir) if data.eval_uri else None
            return train_loader, eval_set
        from pnet_dist.data import build_eval_set, build_image_loader
        decode_on_device = self._decode_on_device()
        train_loader = build_image_loader(
            data.train_uri, train=True, batch_size=data.batch_size, image_size=data.image_size,
            num_workers=data.num_workers, seed=data.shuffle_seed, crop_pct=data.crop_pct,
            randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude, hflip=data.hflip,
            num_canonical_nodes=data.num_canonical_nodes, shuffle=data.shuffle, cache_dir=data.cache_dir,
            decode_on_device=decode_on_device)
        eval_set = build_eval_set(data.eval_uri, batch_size=data.eval_batch_size, image_size=data.image_size,
                                  crop_pct=data.crop_pct, num_workers=data.num_workers, cache_dir=data.cache_dir,
                                  decode_on_device=decode_on_device) if data.eval_uri else None
        return train_loader, eval_set

    def _decode_on_device(self) -> bool:
        """data.decode_device: cpu = loader workers decode; cuda = this rank's GPU (nvJPEG); auto = the GPU
        where the rank trains on one."""
        wanted = self.cfg.data.decode_device
        if wanted == "cuda" and self.device.type != "cuda":
            raise ValueError(f"data.decode_device=cuda but this rank trains on {self.device.type} (no CUDA device "
                             f"visible); set data.decode_device to cpu or auto")
        return wanted == "cuda" or (wanted == "auto" and self.device.type == "cuda")

    def train_loss(self, model, batch, *, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch; `seed` drives its mixup/cutmix (see train.micro_batch_seed)."""
        images, labels = self.pixels(batch, train=True)
        data = self.cfg.data
        if data.mixup_alpha > 0 or data.cutmix_alpha > 0 or data.label_smoothing > 0:
            from pnet_dist.data import mixup_cutmix
            generator = torch.Generator().manual_seed(seed)
            images, targets = mixup_cutmix(images, labels, self.num_classes, mixup_alpha=data.mixup_alpha,
                                           cutmix_alpha=data.cutmix_alpha, label_smoothing=data.label_smoothing,
                                           generator=generator)
        else:
            targets = F.one_hot(labels, self.num_classes).float()
        logits = model(images.to(input_dtype(model)))
        loss = soft_target_cross_entropy(logits, targets)
        return loss, {}

    @torch.no_grad()
    def eval_sums(self, model, batch) -> list[float]:
        images, labels = self.pixels(batch, train=False)
        logits = model(images.to(input_dtype(model))).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct = top5 == labels[:, None]
        return [F.cross_entropy(logits, labels, reduction="sum").item(), correct[:, 0].sum().item(),
                correct.any(dim=-1).sum().item(), labels.numel()]

    def count(self, batch) -> tuple[int, int]:
        return batch[1].shape[0], 0          # the labels: the images may be a list of JPEG bytes

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / count, "top1": 100.0 * sums["top1"] / count,
                "top5": 100.0 * sums["top5"] / count, "samples": sums["count"]}


class CausalLMTask(_Task):
    """Token ids -> next-token logits; CE + MoE aux loss for training, loss + perplexity for eval."""

    eval_keys = ("loss_sum", "count")

    def build_model(self) -> nn.Module:
        kwargs = build_model_kwargs(self.cfg, self._dataset_info())
        self.model_kwargs = kwargs  # recorded in the checkpoint manifest, for the export tool
        model = create_model(self.cfg.model.name, **kwargs)
        model.set_grad_checkpointing(self.cfg.train.grad_checkpointing)
        if self.cfg.data.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"data.seq_len={self.cfg.data.seq_len} exceeds the model's max_seq_len="
                             f"{model.cfg.max_seq_len}; lower data.seq_len or set model.kwargs.max_seq_len")
        self.vocab_size = model.cfg.vocab_size
        self.flops_per_sample = 6.0 * model.num_active_params() * self.cfg.data.seq_len
        return model

    def build_loaders(self) -> tuple[object, object | None]:
        data = self.cfg.data
        if self.synthetic:
            return _synthetic_loaders(self.cfg, _synthetic_text_sample(self.vocab_size, data.seq_len))
        from pnet_dist.data import build_eval_set, build_text_loader

        train_loader = build_text_loader(data.train_uri, batch_size=data.batch_size, seq_len=data.seq_len,
                                         num_workers=data.num_workers, seed=data.shuffle_seed, shuffle=data.shuffle,
                                         num_canonical_nodes=data.num_canonical_nodes, cache_dir=data.cache_dir)
        eval_set = build_eval_set(data.eval_uri, batch_size=data.eval_batch_size, seq_len=data.seq_len,
                                  num_workers=data.num_workers, cache_dir=data.cache_dir) if data.eval_uri else None
        return train_loader, eval_set

    def train_loss(self, model, batch, *, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, labels = (t.to(self.device, non_blocking=True) for t in batch)
        logits, aux_loss = model(input_ids)
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return lm_loss + aux_loss, {"lm_loss": lm_loss.detach(), "aux_loss": aux_loss.detach()}

    @torch.no_grad()
    def eval_sums(self, model, batch) -> list[float]:
        input_ids, labels = (t.to(self.device) for t in batch)
        logits, _ = model(input_ids)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        return [loss_sum.item(), labels.numel()]

    @staticmethod
    def eval_summary(sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": sums["count"]}

    def count(self, batch) -> tuple[int, int]:
        return batch[0].shape[0], batch[0].numel()




def _vision_macs(name: str, kwargs: dict, image_size: int) -> int:
    from pnet_dist.models.counting import count_macs, image_input
    meta_model = create_model(name, device="meta", **kwargs)
    return sum(count_macs(meta_model, image_input(meta_model, size=image_size)).values())


# -- synthetic data ------------------------------------------------------------------------------
def _synthetic_image_sample(num_classes: int, image_size: int):
    """sample(generator) -> (image CHW, label): noise around a per-class pattern (learnable)."""
    patterns = torch.randn(num_classes, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.randint(num_classes, (), generator=generator)
        return patterns[label] + torch.randn(3, image_size, image_size, generator=generator), label
    return sample


def _synthetic_text_sample(vocab_size: int, seq_len: int):
    """sample(generator) -> (input ids T, labels T) from a fixed Zipf-like unigram distribution."""
    probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs /= probs.sum()

    def sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.multinomial(probs, seq_len + 1, replacement=True, generator=generator)
        return tokens[:-1], tokens[1:]
    return sample


def _synthetic_batch(make_sample, seed: int, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [make_sample(torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in sample_ids]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class SyntheticLoader:
    """Endless deterministic random batches. Rank r's k-th sample of global micro-batch m is
    sample m * B * W + r * B + k; the state is the number of global samples consumed."""

    def __init__(self, make_sample, batch_size: int, *, seed: int):
        self.make_sample = make_sample
        self.batch_size = batch_size
        self.seed = seed
        self.samples_consumed = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = dist.get_rank(), dist.get_world_size()
        while True:
            first = self.samples_consumed + rank * self.batch_size
            self.samples_consumed += self.batch_size * world
            yield _synthetic_batch(self.make_sample, self.seed, range(first, first + self.batch_size))

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = state["samples_consumed"]


class SyntheticEvalSet:
    """A fixed set of num_samples deterministic samples, read by global batch (see train.evaluate)."""

    def __init__(self, make_sample, batch_size: int, *, seed: int, num_samples: int):
        self.make_sample = make_sample
        self.batch_size = batch_size
        self.seed = seed
        self.num_samples = num_samples

    def batches(self, indices: list[int], num_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in indices:
            yield _synthetic_batch(self.make_sample, self.seed,
                                   range(b * self.batch_size, min(num_samples, (b + 1) * self.batch_size)))


def _synthetic_loaders(cfg: JobConfig, make_sample) -> tuple[SyntheticLoader, SyntheticEvalSet | None]:
    data = cfg.data
    train = SyntheticLoader(make_sample, data.batch_size, seed=data.shuffle_seed)
    if data.eval_uri is None:
        return train, None
    if not data.eval_uri.startswith(SYNTHETIC):
        raise ValueError(f"data.eval_uri={data.eval_uri!r}: a synthetic train set needs a synthetic eval set "
                         f"(data.eval_uri: '{SYNTHETIC}')")
    if cfg.train.eval_max_samples is None:
        raise ValueError("train.eval_max_samples: a synthetic eval set has no natural size; set it")
    return train, SyntheticEvalSet(make_sample, data.eval_batch_size, seed=data.shuffle_seed + 1,
                                   num_samples=cfg.train.eval_max_samples)
