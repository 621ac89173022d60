"""Benchmark: dynamic convolution speed, ours vs static conv and vs the released CondConv formulation.

Prints, from one run on one machine:
  1. training step (forward + backward) of parameternet_600m / ghostnet_600m, and of
     parameternet_600m on timm's CondConv2d (the released code's grouped-conv layer) / ours;
  2. a per-layer-kind breakdown (1x1, depthwise kxk, stem) over the dynamic convs of
     parameternet_600m: every execution path of DynamicConv2d, timm's CondConv2d and a static
     nn.Conv2d of the same shape, all fwd+bwd at the same batch.

    python tools/bench_dynamic_conv.py                        # CPU, batch 32 at 224x224
    python tools/bench_dynamic_conv.py --batch 8 --repeats 2  # quicker
    python tools/bench_dynamic_conv.py --device cuda --amp bf16 --channels-last --batch 128
    python tools/bench_dynamic_conv.py --dry-run              # debug variant, tiny sizes (tools/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", default="600m", choices=["600m", "300m", "debug"],
                        help="parameternet_<variant> vs ghostnet_<variant>")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per model (median)")
    parser.add_argument("--layer-repeats", type=int, default=3, help="timed fwd+bwd per layer (median)")
    parser.add_argument("--skip-breakdown", action="store_true")
    parser.add_argument("--all-paths", action="store_true", help="also time the dominated 1x1 paths")
    parser.add_argument("--channels-last", action="store_true", help="models, layers and inputs in NHWC")
    parser.add_argument("--dry-run", action="store_true",
                        help="every section on the debug variant at batch 2, 32x32, one repeat: seconds")
    args = parser.parse_args()
    if args.dry_run:
        args.variant, args.batch, args.size, args.repeats, args.layer_repeats = "debug", 2, 32, 1, 1
    return args


if __name__ == "__main__":
    ARGS = parse_args()   # --help and usage errors answer before torch loads (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnet_dist.models import DynamicConv2d, create_model  # noqa: E402
from pnet_dist.models.dynamic_conv import IMPLS  # noqa: E402
from pnet_dist.models.report import median_seconds  # noqa: E402


class ReleasedDynamicConv(nn.Module):
    """The released layer: GAP -> Linear -> sigmoid, then timm's CondConv2d (B-group conv)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, groups=1, bias=False,
                 num_experts=4):
        super().__init__()
        from timm.layers import CondConv2d
        self.routing = nn.Linear(in_channels, num_experts)
        self.cond_conv = CondConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                    bias=bias, num_experts=num_experts)

    def forward(self, x):
        alpha = torch.sigmoid(self.routing(x.mean((2, 3))))
        return self.cond_conv(x, alpha)


def released_conv_factory(in_channels, out_channels, kernel_size, *, stride=1, padding=0, groups=1, bias=False):
    return ReleasedDynamicConv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               groups=groups, bias=bias)


def autocast(device: str, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_channels_last(module: nn.Module) -> None:
    """4-D weights (static convs) to NHWC; nn.Module.to(memory_format=...) refuses the 5-D expert
    banks of the dynamic convs, whose kernels are mixed per sample before the conv runs."""
    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


def train_step_fn(model: nn.Module, batch: int, size: int, device: str, amp: str, channels_last: bool = False):
    """One forward + loss + backward; returns a zero-argument callable."""
    if channels_last:
        to_channels_last(model)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format(channels_last))
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
    return step


def layer_fn(layer: nn.Module, shape: tuple[int, ...], device: str, amp: str, channels_last: bool = False):
    """One fwd+bwd of a single layer (input gradient included, as inside a network)."""
    if channels_last:
        to_channels_last(layer)
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format(channels_last)).requires_grad_()
    cotangent: list[torch.Tensor] = []

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, amp):
            y = layer(x)
        if not cotangent:  # a dense upstream gradient, as BatchNorm's backward hands down
            cotangent.append(torch.randn_like(y))
        y.backward(cotangent[0])
    return step


def dynamic_conv_shapes(model_name: str, batch: int, size: int) -> Counter:
    """(kind, layer config, input shape) -> how many such DynamicConv2d layers the model has."""
    model = create_model(model_name, device="meta")
    shapes: Counter = Counter()
    handles = []
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            def hook(mod, inputs, _output):
                kind = "stem" if mod.in_channels == 3 else {"pointwise": "1x1", "depthwise": "depthwise kxk"}[mod.kind]
                config = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0],
                          mod.groups)
                shapes[(kind, config, (batch, *inputs[0].shape[1:]))] += 1
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device="meta"))
    for handle in handles:
        handle.remove()
    return shapes


def build_layer(variant: str, config: tuple[int, ...], device: str) -> nn.Module:
    in_ch, out_ch, kernel, stride, padding, groups = config
    if variant == "static":
        layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False)
    elif variant == "condconv":
        layer = released_conv_factory(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups)
    else:
        layer = DynamicConv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, impl=variant)
    return layer.to(device)


def layer_variants(config: tuple[int, ...], all_paths: bool) -> list[str]:
    """Baselines plus DynamicConv2d paths; for 1x1 the unfold (a copy + the same bmm) and experts
    (4x the conv work) paths are dominated and only timed with --all-paths."""
    _, _, kernel, _, padding, _ = config
    pointwise = kernel == 1 and padding == 0
    if pointwise and not all_paths:
        paths = ["bmm", "grouped"]
    else:
        paths = [impl for impl in IMPLS if impl != "bmm" or pointwise]
    return ["static", *paths, "condconv"]


def run_breakdown(args) -> list[tuple[str, dict[str, float], str]]:
    """Per layer kind, each variant's fwd+bwd time summed over the model's dynamic convs.

    Variants of one layer are timed round-robin so that background load hits them alike;
    "auto" is the time of the path DynamicConv2d picks by itself for each layer.
    """
    shapes = dynamic_conv_shapes(f"parameternet_{args.variant}", args.batch, args.size)
    seconds_by_kind: dict[str, Counter] = {}
    auto_impl: dict[str, set] = {}
    for (kind, config, shape), count in sorted(shapes.items()):
        totals = seconds_by_kind.setdefault(kind, Counter())
        steps = {variant: layer_fn(build_layer(variant, config, args.device), shape, args.device, args.amp,
                                    args.channels_last)
                 for variant in layer_variants(config, args.all_paths)}
        samples: dict[str, list[float]] = {variant: [] for variant in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(args.layer_repeats):
            for variant, step in steps.items():
                samples[variant].append(median_seconds(step, repeats=1, warmup=0, device=args.device))
        for variant, values in samples.items():
            totals[variant] += statistics.median(values) * count
        chosen = build_layer("auto", config, "meta").impl
        auto_impl.setdefault(kind, set()).add(chosen)
        totals["auto"] += statistics.median(samples[chosen]) * count
        del steps
    return [(kind, dict(totals), "+".join(sorted(auto_impl[kind]))) for kind, totals in seconds_by_kind.items()]


def main(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    dynamic_name, static_name = f"parameternet_{args.variant}", f"ghostnet_{args.variant}"
    models = {
        f"{dynamic_name} (ours)": create_model(dynamic_name, device=args.device),
        f"{static_name} (static)": create_model(static_name, device=args.device),
        # The same network through the conv-factory seam, on the released code's layer.
        f"{dynamic_name} (timm CondConv2d)": create_model(dynamic_name, device=args.device,
                                                          conv_factory=released_conv_factory),
    }
    steps = {name: train_step_fn(model, args.batch, args.size, args.device, args.amp, args.channels_last)
             for name, model in models.items()}
    for step in steps.values():
        step()  # warm-up (allocator, kernel selection)
    # Interleave the models' repeats so background load hits all of them alike.
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            samples[name].append(median_seconds(step, repeats=1, warmup=0, device=args.device))
    step_s = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
    del models, steps

    ours, static, released = step_s.values()
    header = (f"device={args.device} amp={args.amp} channels_last={args.channels_last} batch={args.batch} input={args.size}x{args.size} "
              f"threads={torch.get_num_threads()} torch={torch.__version__} "
              f"load average at start={load_at_start:.1f} (other processes share these cores)")
    print(header)
    print("\n1. training step (forward + backward), median of", args.repeats)
    print(f"{'model':<40}{'step s':>10}{'img/s':>10}")
    for name, seconds in step_s.items():
        print(f"{name:<40}{seconds:>10.3f}{args.batch / seconds:>10.1f}", flush=True)
    print(f"{'ratio parameternet / ghostnet (target <= 1.25)':<52}{ours / static:>8.2f}")
    print(f"{'speed-up ours vs CondConv2d (target >= 2)':<52}{released / ours:>8.2f}")
    # Dynamic convs cannot run faster than the static convs they replace (same conv work plus
    # routing and mixing), so CondConv2d / static network bounds the achievable speed-up.
    print(f"{'limit: CondConv2d / static network':<52}{released / static:>8.2f}", flush=True)

    if not args.skip_breakdown:
        print(f"\n2. per layer kind: fwd+bwd summed over {dynamic_name}'s dynamic convs, ms per step "
              f"(median of {args.layer_repeats} per layer)")
        rows = run_breakdown(args)
        columns = ["static", "auto", *IMPLS, "condconv"]
        print(f"{'kind':<16}{'auto=':<9}" + "".join(f"{c:>10}" for c in columns)
              + f"{'auto/static':>13}{'condconv/auto':>15}")
        for kind, totals, chosen in rows:
            cells = "".join(f"{totals[c] * 1e3:>10.1f}" if c in totals else f"{'-':>10}" for c in columns)
            print(f"{kind:<16}{chosen:<9}{cells}{totals['auto'] / totals['static']:>13.2f}"
                  f"{totals['condconv'] / totals['auto']:>15.2f}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s, load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    from pnet_dist.cli import run
    sys.exit(run(lambda: main(ARGS)))
