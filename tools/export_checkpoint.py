"""Export a pnet_dist checkpoint to a plain fp32 state dict (and a Hugging Face-style folder).

    python tools/export_checkpoint.py RUN_URI OUT_DIR [--step N] [--model NAME] [--model-kwargs JSON]
                                      [--ema-key KEY] [--strip-prefix PREFIX] [--hf]

RUN_URI is <checkpoint.uri>/<run_name> (local or s3://); OUT_DIR local or s3://. The logic lives in
pnet_dist/export.py.
"""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_uri", help="<checkpoint.uri>/<run_name>, local folder or s3://bucket/prefix")
    parser.add_argument("out_dir", help="export folder, local or s3://")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--model", default=None, help="registered model name (default: from the manifest)")
    parser.add_argument("--model-kwargs", default=None, help="JSON object of create_model kwargs")
    parser.add_argument("--ema-key", default=None, help="export the EMA state dict stored under this client_state key")
    parser.add_argument("--strip-prefix", default="", help="drop this prefix from parameter names")
    parser.add_argument("--hf", action="store_true", help="also write hf/ (config.json + model.safetensors), LLaMA only")
    args = parser.parse_args(argv)
    from pnet_dist.export import export_checkpoint   # torch and the models: after --help
    model_kwargs = None
    if args.model_kwargs is not None:
        model_kwargs = json.loads(args.model_kwargs)
        if not isinstance(model_kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    export_checkpoint(args.run_uri, args.out_dir, args.step, model_name=args.model, model_kwargs=model_kwargs,
                      ema_key=args.ema_key, strip_prefix=args.strip_prefix, hf=args.hf)


if __name__ == "__main__":
    main()
