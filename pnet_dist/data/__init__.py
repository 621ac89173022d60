"""Data: MDS shard converters, streaming image/text loaders with exact resume, the image pipeline's
batched device part (RandAugment, normalization, nvJPEG decode), mixup/cutmix, ffcv path.

The public names are imported lazily so that `import pnet_dist.data` stays cheap: mosaicml-streaming
(and the transformers import it drags in) loads only when a loader is built.

    build_image_loader(uri, *, train, batch_size, image_size, ...)  -> loader of (uint8 images, labels_B, ...);
                                                                       device_pipeline turns them into model input
    build_text_loader(uri, *, batch_size, seq_len, ...)             -> loader of (input_ids_BT, labels_BT)
    build_eval_set(uri, *, batch_size, ...)                         -> eval set: the same batches at any world size
    mixup_cutmix(images, labels, num_classes, *, ..., generator)    -> (images, soft_targets_BK)
    dataset_info(uri)                                               -> dict from <uri>/dataset.json
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_image_loader": "pnet_dist.data.images",
    "convert_images": "pnet_dist.data.images",
    "build_text_loader": "pnet_dist.data.text",
    "convert_text": "pnet_dist.data.text",
    "build_eval_set": "pnet_dist.data.evaluation",
    "mixup_cutmix": "pnet_dist.data.augment",
    "dataset_info": "pnet_dist.data.shards",
    "clean_stale_shared_memory": "pnet_dist.data.shards",
    "configure_s3_endpoint": "pnet_dist.data.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pnet_dist.data' has no attribute {name!r}")
