"""Convert an image tree into MDS shards (local folder or s3://bucket/prefix) + class_index.json.

    python tools/make_image_shards.py SRC OUT [--layout auto|folder|tars] [--workers 8]
           [--images-per-part 10000] [--max-side 512] [--class-index train/class_index.json]

SRC is an ImageFolder tree (SRC/<synset>/<image>, the ImageNet-1K train/val layout) or the
ImageNet-22K release layout (SRC/<synset>.tar). A re-run skips finished parts. Images that do not
decode are skipped and listed at the end. The S3 endpoint comes from AWS_ENDPOINT_URL_S3 or
--endpoint-url; credentials only from the standard AWS chain. The logic is pnet_dist.data.images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.cli import run  # noqa: E402
from pnet_dist.data.images import convert_images, load_class_index  # noqa: E402
from pnet_dist.data.shards import configure_s3_endpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="ImageFolder root or folder of <synset>.tar files")
    parser.add_argument("out", help="output folder or s3://bucket/prefix")
    parser.add_argument("--layout", default="auto", choices=["auto", "folder", "tars"])
    parser.add_argument("--class-index", help="synset -> label JSON to use (e.g. the train split's), "
                                              "instead of numbering the synsets found in sorted order")
    parser.add_argument("--images-per-part", type=int, default=10_000, help="unit of resume and of parallelism")
    parser.add_argument("--workers", type=int, default=1, help="parallel part writers")
    parser.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle before sharding")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    args = parser.parse_args()
    configure_s3_endpoint(args.endpoint_url)
    summary = convert_images(args.src, args.out, layout=args.layout,
                             class_index=load_class_index(args.class_index) if args.class_index else None,
                             images_per_part=args.images_per_part, num_workers=args.workers,
                             max_side=args.max_side, quality=args.quality, seed=args.seed)
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
