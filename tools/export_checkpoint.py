"""Export a pnet_dist checkpoint to a plain fp32 state dict (and a Hugging Face folder for LLaMA models).

    python tools/export_checkpoint.py RUN_URI OUT_DIR [--step N] [--model NAME] [--model-kwargs JSON]
                                      [--ema-key KEY] [--strip-prefix PREFIX] [--hf [--dataset URI]]

RUN_URI is <checkpoint.uri>/<run_name> (local or s3://); OUT_DIR local or s3://. --hf also writes
OUT_DIR/hf/, which transformers loads (AutoTokenizer, AutoModelForCausalLM, pipeline; MoE variants
with trust_remote_code=True); its tokenizer is that of the run's training dataset (data.train_uri
in RUN_URI/config.yaml) or of --dataset. The logic lives in pnet_dist/export.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from pnet_dist.cli import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_uri", help="<checkpoint.uri>/<run_name>, local folder or s3://bucket/prefix")
    parser.add_argument("out_dir", help="export folder, local or s3://")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--model", default=None, help="registered model name (default: from the manifest)")
    parser.add_argument("--model-kwargs", default=None, help="JSON object of create_model kwargs")
    parser.add_argument("--ema-key", default=None, help="export the EMA state dict stored under this client_state key")
    parser.add_argument("--strip-prefix", default="", help="drop this prefix from parameter names")
    parser.add_argument("--hf", action="store_true",
                        help="also write hf/, a Hugging Face folder with tokenizer (LLaMA models only)")
    parser.add_argument("--dataset", default=None,
                        help="text dataset (tools/make_text_shards.py output) whose tokenizer goes into hf/ "
                             "(default: the run's data.train_uri)")
    args = parser.parse_args(argv)
    from pnet_dist.export import export_checkpoint   # torch and the models: after --help
    model_kwargs = None
    if args.model_kwargs is not None:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs {args.model_kwargs!r} is not JSON ({exc.msg} at character {exc.pos}); "
                             """write a JSON object, e.g. --model-kwargs '{"num_classes": 10}'""") from None
        if not isinstance(model_kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    if args.dataset is not None and not args.hf:
        parser.error("--dataset only applies with --hf")
    export_checkpoint(args.run_uri, args.out_dir, args.step, model_name=args.model, model_kwargs=model_kwargs,
                      ema_key=args.ema_key, strip_prefix=args.strip_prefix, hf=args.hf, dataset_uri=args.dataset)


if __name__ == "__main__":
    sys.exit(run(main))
