"""Convert an image tree into MDS shards (local folder or s3://bucket/prefix) + class_index.json.

    python tools/make_image_shards.py SRC OUT [--layout auto|folder|tars|flat] [--workers 8]
           [--holdout-per-class 10 --holdout-out HOLDOUT] [--labels LABELS]
           [--images-per-part 10000] [--max-side 512] [--class-index train/class_index.json]

SRC layouts: an ImageFolder tree (SRC/<synset>/<image>, ImageNet-1K train); the ImageNet-22K
release once its outer tar is unpacked (SRC/<synset>.tar, read in place); ImageNet-1K's official
validation folder (SRC/<image>, flat) with --labels: the ILSVRC2012 devkit archive
(ILSVRC2012_devkit_t12.tar.gz), Kaggle's LOC_val_solution.csv or "<file> <synset>" lines -- give
it the train split's --class-index so the labels agree. --holdout-per-class N --holdout-out URI
writes N images of each class (seeded by --seed; at most half a class) to their own dataset, the
rest to OUT: ImageNet-22K's evaluation set. A re-run skips finished parts. Images that do not
decode are skipped and listed at the end. The S3 endpoint comes from AWS_ENDPOINT_URL_S3 or
--endpoint-url; credentials only from the standard AWS chain. The logic is pnet_dist.data.images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.cli import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ImageFolder root, folder of <synset>.tar files, or flat folder of images")
    parser.add_argument("out", help="output folder or s3://bucket/prefix")
    parser.add_argument("--layout", default="auto", choices=["auto", "folder", "tars", "flat"])
    parser.add_argument("--labels", help="label file of a flat layout (devkit archive, LOC_val_solution.csv, "
                                         "or '<file> <synset>' lines)")
    parser.add_argument("--holdout-per-class", type=int, default=0, help="images of each class to hold out")
    parser.add_argument("--holdout-out", help="output of the held-out images (folder or s3://bucket/prefix)")
    parser.add_argument("--class-index", help="synset -> label JSON to use (e.g. the train split's), "
                                              "instead of numbering the synsets found in sorted order")
    parser.add_argument("--images-per-part", type=int, default=10_000, help="unit of resume and of parallelism")
    parser.add_argument("--workers", type=int, default=1, help="parallel part writers")
    parser.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and of the hold-out split")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    args = parser.parse_args()
    if bool(args.holdout_per_class) != bool(args.holdout_out):
        parser.error("--holdout-per-class and --holdout-out go together")

    from pnet_dist.data.images import convert_images, load_class_index   # numpy, PIL, streaming: after --help
    from pnet_dist.data.shards import configure_s3_endpoint

    configure_s3_endpoint(args.endpoint_url)
    started = time.perf_counter()
    summary = convert_images(args.src, args.out, layout=args.layout, labels_file=args.labels,
                             class_index=load_class_index(args.class_index) if args.class_index else None,
                             holdout_per_class=args.holdout_per_class, holdout_uri=args.holdout_out,
                             images_per_part=args.images_per_part, num_workers=args.workers,
                             max_side=args.max_side, quality=args.quality, seed=args.seed)
    print(summary.report())
    print(f"converted in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
