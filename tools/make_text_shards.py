"""Tokenize .txt / .jsonl files into fixed-length MDS token samples (local folder or s3://bucket/prefix).

    python tools/make_text_shards.py INPUT... --out OUT --seq-len 2048 --tokenizer tokenizer.json
    python tools/make_text_shards.py INPUT... --out OUT --seq-len 2048 --train-vocab-size 32000
    python tools/make_text_shards.py --train-tokenizer-only INPUT... --out tok.json --train-vocab-size 32000

INPUT: files or folders (.txt = one document; .jsonl = one document per line in --field). Documents
are joined with EOS; samples are seq_len + 1 tokens (uint16 when the vocabulary fits). The tokenizer
JSON is written beside the shards. A re-run skips finished input files. The logic is
pnet_dist.data.text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.cli import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt / .jsonl files or folders holding them")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (a .json path with "
                                                     "--train-tokenizer-only)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="Hugging Face tokenizers JSON file")
    parser.add_argument("--train-vocab-size", type=int, help="train a byte-level BPE of this size on the inputs")
    parser.add_argument("--train-tokenizer-only", action="store_true", help="only train and save the tokenizer")
    parser.add_argument("--field", default="text", help="text field of .jsonl records")
    parser.add_argument("--eos-token", help="token that ends a document (default: the first of <|endoftext|>, "
                                            "</s>, <eos>, [SEP] in the vocabulary)")
    parser.add_argument("--workers", type=int, default=1, help="input files tokenized in parallel")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    args = parser.parse_args()
    from pnet_dist.data.shards import configure_s3_endpoint   # numpy, tokenizers: after --help
    from pnet_dist.data.text import convert_text, list_inputs, train_tokenizer
    configure_s3_endpoint(args.endpoint_url)
    if args.train_tokenizer_only:
        if not args.train_vocab_size:
            parser.error("--train-tokenizer-only needs --train-vocab-size")
        tokenizer = train_tokenizer(list_inputs(args.inputs), args.out, vocab_size=args.train_vocab_size,
                                    field=args.field, eos_token=args.eos_token or "<|endoftext|>")
        print(f"wrote {args.out}: vocabulary {tokenizer.get_vocab_size()}")
        return 0
    summary = convert_text(args.inputs, args.out, seq_len=args.seq_len, tokenizer_path=args.tokenizer,
                           vocab_size=args.train_vocab_size, field=args.field, eos_token=args.eos_token,
                           num_workers=args.workers)
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
