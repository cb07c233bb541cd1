"""Measure, ahead of the benchmarks, how each convolution of a network runs fastest (fastres.tune), so that the
one-time autotuning cost is a step of its own rather than hidden in the first batch of a throughput run.

    python benchmarks/tune_models.py --arch resnet50 --batch-size 256 --dtype bf16 --modes infer,train

The choices go to fastres's on-disk autotune cache ($FASTRES_CACHE_DIR/autotune.json, default
~/.cache/fastres/), where later runs on the same GPU and software versions find them: ResNet-101 and -152 pose the
same convolution problems as ResNet-50 at the same batch size, and benchmarks/kernels.py's rows are ResNet-50's
layers. Each new choice is written as soon as it is measured, so a run cut short keeps what it measured.
On CPU tensors nothing is measured (fastres's CPU path has no tile configs to choose); the command then only lists
the problems it met.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--variant", choices=C.VARIANTS, default="v1.5")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--input-size", type=int)
    p.add_argument("--modes", default="infer,train", help="comma-separated: infer (eval, BN folded), train")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = p.parse_args(argv)
    try:
        arch = C.parse_arch(args.arch, args.variant)
    except ValueError as e:
        p.error(f"--arch: {e}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("infer", "train") for m in modes):
        p.error(f"--modes must be infer and/or train, got {args.modes!r}")
    if args.batch_size < 2:
        p.error("--batch-size must be >= 2")
    import fastres
    from fastres.kernels import autotune

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    size = args.input_size or arch.input_size
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, _ = C.build_pair(arch, calibrate_shape=(4, 3, size, size))
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(args.batch_size, 3, size, size).to(device, dtype).contiguous(memory_format=fmt)
    print(f"{arch.label}, batch {args.batch_size}, {args.dtype}, {size}x{size}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {C.device_name(device)}; "
          f"cache {autotune.cache_path()}")
    for mode in modes:
        model.train(mode == "train")
        known = set(autotune.cache().entries())
        start = time.perf_counter()
        choices = fastres.tune(model, x, backward=mode == "train")
        C.synchronize(device)
        new = [k for k in choices if k not in known]
        print(f"{mode}: {len(choices)} conv problems, {len(new)} measured now, {time.perf_counter() - start:.1f} s")
        for key, choice in sorted(choices.items()):
            problem = "|".join(key.split("|")[:-4])  # the key less its device signature (4 fields)
            print(f"  {'new   ' if key in new else 'cached'} {choice.label():<28} {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
