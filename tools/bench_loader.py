"""Benchmark the image (and text) data path and print one table of ratios measured in one run.

    python tools/bench_loader.py [--images 400] [--epochs 3] [--rounds 5] [--device cpu|cuda] [--workers N]
                                 [--dry-run]

Images: ImageNet-like JPEGs (~500x375, quality 90) cut from scikit-learn's two sample photos with
random crops, scales, flips and colour shifts, in an ImageFolder of 10 classes.

The training pipeline is split where the batch forms (pnet_dist.data.augment): loader workers
decode, crop and flip, and draw each sample's RandAugment ops -- the CPU share; RandAugment,
normalization and mixup/cutmix run batched on the training device. Rows (one core each, rates per
CPU second of this process, see `rate`):
  decode + RandomResizedCrop(224) + flip per backend (PIL, PIL draft, torchvision.io.decode_jpeg,
  PyTurboJPEG, simplejpeg = ours, DALI's CPU-only pipeline when nvidia-dali is installed) vs PIL;
  the CPU share of our training pipeline (streaming loader, in process) vs torchvision ImageFolder +
  PIL with RandomResizedCrop, flip, RandAugment 2/9, ToTensor, Normalize -- target >= 2x; the same
  without RandAugment -- target >= 2.5x (both in --rounds paired rounds, ours and the baseline back
  to back; the ratio is the median of the rounds' ratios); and JPEG decode alone vs that baseline:
  the limit of any CPU share on these images (at 224 px a ~500x375 JPEG admits no DCT-domain downscale);
  the batched part on THIS CPU (RandAugment 2/9 + normalize + mixup/cutmix, per image), and ours in
  total on this CPU (CPU share + batched part) vs the same baseline: the honest figure when there is
  no GPU;
  ffcv (1 worker) vs ours without RandAugment, when ffcv imports;
  tokens/s of the text loader (King James Bible, seq_len 512);
  time to first batch from an S3 endpoint (moto on 127.0.0.1, started here) vs from local disk.
--device cuda adds wall-clock images/s per GPU with --workers loader workers: the GPU path
(nvJPEG decode + crop + RandAugment + normalize on the GPU, data.decode_device: cuda) vs the CPU
path on all --workers cores (RandAugment and normalize still on the GPU), and DALI's GPU pipeline
(mixed decoder, random crop, resize, flip; JPEGs from memory) as the anchor.
--dry-run: tiny sizes, every row, to keep the script from rotting (CI and tools/gpu_check.sh).
pillow-simd is not a row: it replaces Pillow under the same import name, so it cannot sit in the
project's environment beside Pillow.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_photos(root: Path, num_images: int) -> list[bytes]:
    """ImageNet-like JPEGs from scikit-learn's sample photos, written as root/<class>/<i>.JPEG."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        scale = rng.uniform(1.0, 2.0)
        big = photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.BICUBIC)
        w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
        w, h = min(w, big.width), min(h, big.height)
        x0, y0 = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        img = big.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        folder = root / f"n{i % 10:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:05d}.JPEG").write_bytes(buf.getvalue())
        blobs.append(buf.getvalue())
    return blobs


def rate(fn, count: int, repeats: int = 1) -> float:
    """Items per CPU second of fn() which processes count items (best of repeats).

    CPU time of this process (all its threads), not wall time: on a shared 2-core machine other
    jobs steal wall time, and every single-core row here runs inside this one process.
    """
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return count / best


def decoder_rows(blobs: list[bytes]) -> list[tuple[str, float]]:
    import numpy as np
    import torch
    from PIL import Image
    from pnet_dist.data.augment import random_resized_crop_box
    import torchvision.transforms.v2.functional as TF
    from pnet_dist.data.augment import decode_jpeg_rgb

    def rrc_box(w, h, rng):
        top, left, ch, cw = random_resized_crop_box(h, w, rng)
        return top, left, ch, cw

    def pil(draft: bool):
        rng = np.random.default_rng(0)
        for blob in blobs:
            img = Image.open(io.BytesIO(blob))
            width, height = img.size
            top, left, ch, cw = rrc_box(width, height, rng)
            if draft:
                # libjpeg DCT-domain downscale (1/2, 1/4, 1/8) while the crop stays >= the output size
                img.draft("RGB", (max(1, width * 224 // cw), max(1, height * 224 // ch)))
                sx, sy = img.size[0] / width, img.size[1] / height
                top, left, ch, cw = int(top * sy), int(left * sx), max(1, int(ch * sy)), max(1, int(cw * sx))
            img = img.convert("RGB").resize((224, 224), Image.BILINEAR, box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            torch.from_numpy(np.asarray(img)).permute(2, 0, 1).contiguous()

    def tensor_path(decode):
        rng = np.random.default_rng(0)
        for blob in blobs:
            img = decode(blob)
            top, left, ch, cw = rrc_box(img.shape[-1], img.shape[-2], rng)
            img = TF.resized_crop(img, top, left, ch, cw, [224, 224], antialias=True)
            if rng.random() < 0.5:
                img = TF.horizontal_flip(img)

    from torchvision.io import ImageReadMode, decode_jpeg
    rows = [("PIL", rate(lambda: pil(False), len(blobs), 2)), ("PIL + draft", rate(lambda: pil(True), len(blobs), 2)),
            ("torchvision.io.decode_jpeg", rate(lambda: tensor_path(
                lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)),
                len(blobs), 2))]
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        turbo = TurboJPEG()
        rows.append(("PyTurboJPEG", rate(lambda: tensor_path(
            lambda b: torch.from_numpy(turbo.decode(b, pixel_format=TJPF_RGB)).permute(2, 0, 1)), len(blobs), 2)))
    except (ImportError, RuntimeError, OSError):
        rows.append(("PyTurboJPEG (not installed)", float("nan")))
    rows.append(("simplejpeg (ours)", rate(lambda: tensor_path(decode_jpeg_rgb), len(blobs), 2)))
    rows.append(("DALI CPU-only, 1 thread", dali_cpu_rate(blobs, min(32, len(blobs)))))
    return rows


def dali_cpu_rate(blobs: list[bytes], batch_size: int = 32) -> float:
    """DALI's CPU-only decode + random crop + resize(224) + flip, one thread, per CPU second."""
    import numpy as np
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return float("nan")

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
    def pipeline():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=224, resize_y=224)
        return fn.flip(images, horizontal=fn.random.coin_flip())

    pipe = pipeline()
    pipe.build()
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    batches = [arrays[i:i + batch_size] for i in range(0, len(arrays) - batch_size + 1, batch_size)]

    def run():
        for batch in batches:
            pipe.feed_input("jpegs", batch)
            pipe.run()
    run()                                                     # warm: buffers, thread start
    return rate(run, len(batches) * batch_size, 2)


def drain(loader) -> int:
    count = 0
    for batch in loader:
        count += batch[1].shape[0]                            # labels: every loader yields them second
    return count


def steady_rate(loader, epochs: int) -> float:
    """Images per CPU second after each epoch's first batch, for ours and the baselines alike: the
    per-epoch start-up (streaming's partition, ~50 ms) is noise at ImageNet's 10k batches an epoch."""
    count, seconds = 0, 0.0
    for _ in range(epochs):
        batches = iter(loader)
        next(batches)
        start = time.process_time()
        for batch in batches:
            count += batch[1].shape[0]
        seconds += time.process_time() - start
    return count / seconds


def batched_part_rate(loader, batches: int, num_classes: int = 10) -> float:
    """RandAugment 2/9 + normalize + mixup/cutmix on this CPU, per image, over `batches` loader batches."""
    import torch
    from pnet_dist.data.augment import mixup_cutmix
    from pnet_dist.data.device_pipeline import DeviceImagePipeline
    pipeline = DeviceImagePipeline(torch.device("cpu"), image_size=224, crop_pct=0.875, randaugment_magnitude=9)
    collected = [batch for _, batch in zip(range(batches), loader)]

    def run():
        for step, batch in enumerate(collected):
            images, labels = pipeline(batch, train=True)
            mixup_cutmix(images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                         generator=torch.Generator().manual_seed(step))
    return rate(run, sum(b[1].shape[0] for b in collected), 2)


def gpu_rows(uri: str, blobs: list[bytes], args) -> list[tuple[str, str, float, str]]:
    """Wall-clock images/s on one GPU: GPU decode path vs the CPU path on --workers cores, and DALI."""
    import numpy as np
    import torch
    from pnet_dist.data import build_image_loader
    from pnet_dist.data.device_pipeline import DeviceImagePipeline
    device = torch.device("cuda")
    pipeline = DeviceImagePipeline(device, image_size=224, crop_pct=0.875, randaugment_magnitude=9)

    def wall_rate(decode_on_device: bool) -> float:
        loader = build_image_loader(uri, train=True, batch_size=args.batch_size, image_size=224,
                                    num_workers=args.workers, seed=0, randaugment_ops=2,
                                    decode_on_device=decode_on_device)
        for batch in loader:                                   # warm: workers, nvJPEG handles
            pipeline(batch, train=True)
        torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                images, _ = pipeline(batch, train=True)
                count += images.shape[0]
        torch.cuda.synchronize()
        return count / (time.perf_counter() - started)

    cpu_path, gpu_path = wall_rate(False), wall_rate(True)
    rows = [(f"GPU path (nvJPEG) vs CPU path on {args.workers} workers, per GPU", f"{gpu_path:,.0f} img/s",
             gpu_path / cpu_path, f"CPU path {cpu_path:,.0f} img/s")]
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return rows + [("DALI on the GPU: not installed (pip install -e '.[dali]')", "-", float("nan"), "-")]

    @pipeline_def(batch_size=args.batch_size, num_threads=max(1, args.workers), device_id=0, seed=0)
    def dali_pipeline():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        images = fn.decoders.image_random_crop(jpegs, device="mixed", output_type=types.RGB)
        images = fn.resize(images, resize_x=224, resize_y=224)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                                        std=[0.229 * 255, 0.224 * 255, 0.225 * 255], mirror=fn.random.coin_flip())

    pipe = dali_pipeline()
    pipe.build()
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    batches = [arrays[i:i + args.batch_size] for i in range(0, len(arrays) - args.batch_size + 1, args.batch_size)]
    for batch in batches:                                     # warm
        pipe.feed_input("jpegs", batch)
        pipe.run()
    count, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        for batch in batches:
            pipe.feed_input("jpegs", batch)
            pipe.run()
            count += len(batch)
    dali = count / (time.perf_counter() - started)
    return rows + [("DALI on the GPU (mixed decoder, JPEGs from memory) vs our GPU path", f"{dali:,.0f} img/s",
                    dali / gpu_path, f"ours {gpu_path:,.0f} img/s")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda adds the GPU-path rows (images/s per GPU)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="loader workers for the --device cuda rows (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired rounds of the training-pipeline rows (ours and the baseline back to back)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: every row runs, in seconds")
    args = parser.parse_args()
    if args.dry_run:
        args.images, args.epochs, args.batch_size, args.rounds = 24, 1, 8, 1
    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()

    import numpy as np   # the heavy imports come after --help
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    import torchvision
    from torchvision import transforms as T
    from pnet_dist.data import build_image_loader, build_text_loader
    from pnet_dist.data.images import convert_images
    torch.set_num_threads(1)

    table: list[tuple[str, str, float, str]] = []      # name, ours, ratio, baseline
    spread: dict[str, list[float]] = {}                 # the rounds' ratios of the paired rows
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        blobs = make_photos(tmp / "folder", args.images)
        print(f"{len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB", flush=True)
        convert_images(str(tmp / "folder"), str(tmp / "mds"), images_per_part=1000)

        rows = decoder_rows(blobs)
        pil_rate = rows[0][1]
        from pnet_dist.data.augment import decode_jpeg_rgb
        decode_alone = rate(lambda: [decode_jpeg_rgb(b) for b in blobs], len(blobs), 2)
        for name, value in rows:
            table.append((f"decode+RRC+flip: {name}",
                          f"{value:,.0f} img/s" if value == value else "not installed", value / pil_rate,
                          f"PIL {pil_rate:,.0f} img/s"))

        def ours_loader(randaugment_ops: int):
            return build_image_loader(str(tmp / "mds"), train=True, batch_size=args.batch_size, image_size=224,
                                      num_workers=0, seed=0, randaugment_ops=randaugment_ops)

        def ours(randaugment_ops: int):
            loader = ours_loader(randaugment_ops)
            drain(loader)                                     # warm: shard index, first epoch set-up
            return steady_rate(loader, args.epochs)

        def baseline(randaugment_ops: int):
            ops = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
            if randaugment_ops:
                ops.append(T.RandAugment(randaugment_ops, 9))
            ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
            dataset = torchvision.datasets.ImageFolder(str(tmp / "folder"), T.Compose(ops))
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
            drain(loader)
            return steady_rate(loader, args.epochs)

        # Paired rounds: each round measures ours and the baseline back to back (the order
        # alternates), for both pipelines; a row reports the median rates and the median of the
        # rounds' ratios, so a slow phase of a shared machine hits both sides of a ratio alike.
        measured: dict[int, list[tuple[float, float]]] = {2: [], 0: []}
        for round_index in range(args.rounds):
            for ra in (2, 0):
                if round_index % 2:
                    base_rate = baseline(ra)
                    ours_rate = ours(ra)
                else:
                    ours_rate = ours(ra)
                    base_rate = baseline(ra)
                measured[ra].append((ours_rate, base_rate))
        rates = {}
        for ra in (2, 0):
            ours_rate = statistics.median(o for o, _ in measured[ra])
            base_rate = statistics.median(b for _, b in measured[ra])
            ratio = statistics.median(o / b for o, b in measured[ra])
            rates[ra] = ours_rate, base_rate
            label = "RandAugment 2/9" if ra else "no RandAugment"
            table.append((f"train pipeline, {label}: ours CPU share (1 core)", f"{ours_rate:,.0f} img/s",
                          ratio, f"ImageFolder+PIL {base_rate:,.0f} img/s"))
            spread[label] = [round(o / b, 2) for o, b in measured[ra]]
        table.append(("  limit of any CPU share here: decode alone, full size", f"{decode_alone:,.0f} img/s",
                      decode_alone / rates[0][1], f"ImageFolder+PIL {rates[0][1]:,.0f} img/s"))
        batched = batched_part_rate(ours_loader(2), max(2, args.images // args.batch_size))
        ours_share, base_ra = rates[2]
        total = 1.0 / (1.0 / ours_share + 1.0 / batched)
        table.append(("batched RandAugment+normalize+mixup on this CPU, per image", f"{batched:,.0f} img/s",
                      float("nan"), "-"))
        table.append(("train pipeline, RandAugment 2/9: ours in total on this CPU", f"{total:,.0f} img/s",
                      total / base_ra, f"ImageFolder+PIL {base_ra:,.0f} img/s"))
        ours_plain = rates[0][0]
        try:
            from pnet_dist.data.ffcv_path import build_ffcv_image_loader, write_beton
            beton = str(tmp / "bench.beton")
            write_beton(str(tmp / "mds"), beton, max_resolution=512)
            ffcv_loader = build_ffcv_image_loader(beton, train=True, batch_size=args.batch_size, image_size=224,
                                                  num_workers=1, seed=0)
            drain(ffcv_loader)                                # first epoch compiles the numba pipeline
            ffcv_rate = steady_rate(ffcv_loader, args.epochs)
            table.append(("train pipeline, no RandAugment: ffcv (1 worker) vs ours", f"{ffcv_rate:,.0f} img/s",
                          ffcv_rate / ours_plain, f"ours {ours_plain:,.0f} img/s"))
        except ImportError as exc:
            table.append((f"ffcv: not run ({exc})", "-", float("nan"), "-"))
        if args.device == "cuda":
            table += gpu_rows(str(tmp / "mds"), blobs, args)
        # Text: the King James Bible, seq_len 512.
        from pnet_dist.data.quickstart import kjv_chapters
        from pnet_dist.data.text import convert_text
        corpus = tmp / "kjv.jsonl"
        import json
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for _, _, t in kjv_chapters()))
        convert_text([str(corpus)], str(tmp / "text"), seq_len=512, vocab_size=8192)
        text_loader = build_text_loader(str(tmp / "text"), batch_size=16, seq_len=512, num_workers=0)
        start = time.process_time()
        num_tokens = sum(x.numel() for x, _ in text_loader)
        tokens_rate = num_tokens / (time.process_time() - start)
        table.append(("text loader (seq 512, batch 16, 1 core)", f"{tokens_rate:,.0f} tok/s", float("nan"), "-"))

        # Time to first batch: S3 endpoint (moto, 127.0.0.1) vs local disk, fresh cache each.
        from moto.server import ThreadedMotoServer
        from pnet_dist.data.shards import configure_s3_endpoint
        from pnet_dist.storage import open_storage
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            configure_s3_endpoint(f"http://{host}:{port}")
            from pnet_dist.storage import s3_client
            s3_client().create_bucket(Bucket="bench")
            local = open_storage(str(tmp / "mds"))
            remote = open_storage("s3://bench/mds")
            for key in local.list():
                remote.put_file(str(tmp / "mds" / key), key)

            def first_batch(uri: str, cache: str) -> float:
                start = time.perf_counter()
                loader = build_image_loader(uri, train=True, batch_size=args.batch_size, image_size=224,
                                            num_workers=0, seed=1, cache_dir=cache)
                next(iter(loader))
                return time.perf_counter() - start

            s3_time = first_batch("s3://bench/mds", str(tmp / "cache_s3"))
            local_time = first_batch(str(tmp / "mds"), None)
            table.append(("time to first batch: S3 endpoint (moto) vs local disk", f"{s3_time:.2f} s",
                          local_time / s3_time, f"local disk {local_time:.2f} s"))
        finally:
            server.stop()

    print()
    print(f"{'measurement':62s} {'ours':>14s} {'ratio':>7s}  baseline")
    for name, value, ratio, base in table:
        print(f"{name:62s} {value:>14s} {ratio:7.2f}  {base}" if ratio == ratio else f"{name:62s} {value:>14s}       -")
    print("ratio = ours / baseline rate; for time to first batch, baseline time / ours (below 1 = slower than local)")
    print("targets: CPU share vs ImageFolder+PIL >= 2x with RandAugment, >= 2.5x without")
    for label, ratios in spread.items():
        print(f"train pipeline, {label}: the {len(ratios)} rounds' ratios (ours / ImageFolder+PIL) {ratios}")
    print(f"load average (1 min) at start {load_at_start:.1f}, at end {os.getloadavg()[0]:.1f}; "
          f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    from pnet_dist.cli import run
    sys.exit(run(main))
