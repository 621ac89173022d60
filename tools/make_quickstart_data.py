"""Write the quickstart dataset (real MNIST digits + the King James Bible, shipped in pip packages).

    python tools/make_quickstart_data.py --out DIR [--seq-len 128] [--vocab-size 4096]

Writes DIR/images/{train,val} (32x32 JPEG digits in MDS + class_index.json) and DIR/text/{train,val}
(+ tokenizer.json). DIR may be s3://bucket/prefix. The logic is pnet_dist.data.quickstart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.cli import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    args = parser.parse_args()
    from pnet_dist.data.quickstart import make_quickstart_data   # numpy, the converters: after --help
    from pnet_dist.data.shards import configure_s3_endpoint
    configure_s3_endpoint(args.endpoint_url)
    for name, summary in make_quickstart_data(args.out, seq_len=args.seq_len, vocab_size=args.vocab_size).items():
        print(f"{name}: {summary.report()}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
