"""Write an ffcv dataset from image shards, for jobs with `data.format: ffcv`.

    python tools/make_ffcv_beton.py SHARDS OUT [--max-resolution 512] [--quality 90] [--workers 8]

SHARDS: image shards written by tools/make_image_shards.py (a folder or s3://bucket/prefix).
OUT: a folder or s3://bucket/prefix that gets dataset.beton, dataset.json and class_index.json;
point data.train_uri (or data.eval_uri) at it. ffcv re-encodes every image (JPEG at --quality,
longer side capped at --max-resolution). Needs the optional extra: pip install -e '.[ffcv]'.
The S3 endpoint comes from AWS_ENDPOINT_URL_S3 or --endpoint-url; credentials only from the
standard AWS chain. The logic is pnet_dist.data.ffcv_path.write_beton.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="image shards (folder or s3://bucket/prefix)")
    parser.add_argument("out", help="output folder or s3://bucket/prefix")
    parser.add_argument("--max-resolution", type=int, default=512, help="longer side of the stored images")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of ffcv's re-encoding")
    parser.add_argument("--workers", type=int, default=1, help="ffcv writer processes")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    args = parser.parse_args()

    from pnet_dist.data.ffcv_path import write_beton   # ffcv, numba, torch: after --help
    from pnet_dist.data.shards import configure_s3_endpoint

    configure_s3_endpoint(args.endpoint_url)
    started = time.perf_counter()
    num_samples = write_beton(args.shards, args.out, max_resolution=args.max_resolution,
                              jpeg_quality=args.quality, num_workers=args.workers)
    seconds = time.perf_counter() - started
    print(f"{num_samples} images -> {args.out} in {seconds:.1f} s ({num_samples / seconds:,.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
