#!/usr/bin/env python
"""Train a fastres ResNet with the paper's recipe, on one process or many (DistributedDataParallel under torchrun).

    python examples/train.py --arch cifar_resnet20 --dataset cifar10 --data ~/data/cifar-10-batches-py --out runs/r20
    torchrun --nproc-per-node 8 examples/train.py --arch resnet50 --dataset imagefolder --data ~/data/imagenet \\
        --epochs 90 --lr-milestones 30,60 --batch-size 256 --sync-bn --out runs/r50
    python examples/train.py --arch cifar_resnet20 --dataset synthetic --epochs 2 --out runs/smoke   # no data needed
    python examples/train.py ... --out runs/r20 --resume          # continues bit for bit where the run stopped

The recipe (He et al. 2015): SGD with momentum 0.9 and weight decay 1e-4, learning rate 0.1 divided by 10 at the
milestones (default: at 50% and 75% of the epochs, CIFAR-10's 32k and 48k of 64k iterations), BatchNorm after every
conv, random crops and horizontal flips. Mixed precision through autocast (bf16 by default on GPUs), channels_last
on GPUs, --sync-bn for fastres.nn.convert_sync_batchnorm.

Data (never downloaded): --dataset imagefolder reads DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg (needs
torchvision and Pillow); --dataset cifar10 reads CIFAR-10's python pickles (data_batch_1..5, test_batch, as in
cifar-10-python.tar.gz) from DATA or DATA/cifar-10-batches-py; --dataset synthetic makes learnable random images
for smoke runs.

Output in --out: metrics.csv (per epoch: learning rate, train/val loss and error, images/s), curves.png,
checkpoint.pt (after every epoch, written to a temporary file and renamed, so a crash never leaves a broken one).
--resume loads checkpoint.pt and continues with the same data order and augmentation: the weights after N epochs
are bitwise those of an uninterrupted run (on GPUs with --deterministic).
"""
import argparse
import csv
import io
import math
import os
import pickle
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Runs from a checkout without installing fastres, too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastres  # noqa: E402
import fastres.models as fm  # noqa: E402

PROG = "train.py"
DATASETS = ("synthetic", "cifar10", "imagefolder")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_error", "images_per_s", "epoch_s")
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CHECKPOINT = "checkpoint.pt"
# What a resumed run must share with the run it continues (the rest, e.g. --workers or --epochs, may change).
RESUME_KEYS = ("arch", "variant", "plain", "shortcut", "dataset", "batch_size", "lr", "momentum", "weight_decay",
               "lr_milestones", "seed", "amp", "channels_last", "sync_bn", "world_size", "image_size",
               "synthetic_size")


class UsageError(Exception):
    """A problem with the command line or the data that the user can fix: reported as one line, no traceback."""


# ---------------------------------------------------------------------------------------------- arguments
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="cifar_resnet20",
                   help="resnet18/34/50/101/152, cifar_resnet<6n+2> (20, 32, 44, 56, 110, 1202) or vgg19 "
                        "(default cifar_resnet20)")
    p.add_argument("--variant", choices=("v1.5", "v1"), default="v1.5", help="ImageNet Bottleneck ResNets: stride "
                   "on the 3x3 (v1.5, torchvision) or on the first 1x1 (v1, the paper)")
    p.add_argument("--plain", action="store_true", help="the paper's plain net: no shortcuts")
    p.add_argument("--shortcut", choices=("A", "B", "C"), default="A", help="CIFAR ResNets: option A, B or C")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic")
    p.add_argument("--data", help="the data folder (cifar10, imagefolder)")
    p.add_argument("--synthetic-size", type=_positive_int, default=1024, help="synthetic training images "
                   "(default 1024; a quarter as many for validation)")
    p.add_argument("--image-size", type=_positive_int, help="crop size (default: 32 for CIFAR ResNets, else 224)")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--batch-size", type=_positive_int, default=128, help="global batch, split over the processes "
                   "(default 128)")
    p.add_argument("--lr", type=_non_negative_float, default=0.1)
    p.add_argument("--momentum", type=_non_negative_float, default=0.9)
    p.add_argument("--weight-decay", type=_non_negative_float, default=1e-4)
    p.add_argument("--lr-milestones", help="comma-separated epochs after which the learning rate is divided by 10 "
                   "(default: at 50%% and 75%% of --epochs)")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast dtype (auto: bf16 on GPUs, none on CPUs)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="default: on GPUs")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--memory", choices=fastres.nn.MEMORY_MODES, default=fastres.nn.DEFAULT_MEMORY_MODE,
                   help="fastres.nn.set_memory_mode: recompute (default: least activation memory, each Bottleneck's "
                        "last 1x1 conv runs again in backward) or lean (1-8%% faster steps, more memory)"),
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes "
                   "(fastres.nn.convert_sync_batchnorm)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels (bit-exact resume on "
                   "GPUs; slower)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per training process (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for metrics.csv, curves.png and checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--stop-after-epochs", type=_positive_int,
                   help="stop (as if interrupted) once this many epochs are done in total")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not re.fullmatch(r"resnet(18|34|50|101|152)|cifar_resnet\d+|vgg19", args.arch):
        p.error(f"--arch: unknown architecture {args.arch!r}; choose one of {', '.join(IMAGENET_ARCHS)}, "
                "cifar_resnet<6n+2> (e.g. cifar_resnet20) or vgg19")
    if args.arch.startswith("cifar_resnet"):
        depth = int(args.arch[len("cifar_resnet"):])
        if depth < 8 or (depth - 2) % 6:
            p.error(f"--arch: CIFAR ResNets have depth 6n+2 (20, 32, 44, 56, 110, 1202), got {depth}")
    if args.plain and args.arch == "vgg19":
        p.error("--plain applies to ResNets, not vgg19")
    if args.dataset == "synthetic":
        if args.data:
            p.error("--data is not used with --dataset synthetic")
    elif not args.data:
        p.error(f"--dataset {args.dataset} needs --data (the folder holding the data; nothing is downloaded)")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.image_size is None:
        args.image_size = 32 if args.arch.startswith("cifar_resnet") else 224
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8, got {args.image_size}")
    if args.lr_milestones is None:
        args.lr_milestones = sorted({max(1, round(args.epochs * 0.5)), max(1, round(args.epochs * 0.75))})
    else:
        try:
            args.lr_milestones = sorted(int(m) for m in args.lr_milestones.split(",") if m.strip())
        except ValueError:
            p.error(f"--lr-milestones must be comma-separated epochs, got {args.lr_milestones!r}")
        if any(m < 1 for m in args.lr_milestones):
            p.error(f"--lr-milestones must be >= 1, got {args.lr_milestones}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.amp == "auto":
        args.amp = "bf16" if args.device == "cuda" else "none"
    if args.amp == "fp16" and args.device == "cpu":
        p.error("--amp fp16 needs a GPU (use --amp bf16 on CPUs)")
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    return args


# ---------------------------------------------------------------------------------------------- data
MEANS = {"cifar10": (0.4914, 0.4822, 0.4465), "imagenet": (0.485, 0.456, 0.406)}
STDS = {"cifar10": (0.2470, 0.2435, 0.2616), "imagenet": (0.229, 0.224, 0.225)}


def _sample_seed(seed, epoch, index):
    """Every random choice about one sample in one epoch comes from this seed: the same in an uninterrupted and in
    a resumed run, whichever loader process draws it."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SyntheticImages(Dataset):
    """`size` random images whose class (one of `num_classes`) sets a per-channel offset and a stripe pattern:
    learnable, so a smoke run's loss goes down."""

    def __init__(self, size, num_classes, image_size, seed, split):
        g = torch.Generator().manual_seed(seed * 7 + (0 if split == "train" else 1))
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        self.noise_seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
        g_cls = torch.Generator().manual_seed(12345)
        self.class_means = torch.randn(num_classes, 3, 1, 1, generator=g_cls)
        self.freqs = torch.randint(1, 4, (num_classes,), generator=g_cls)
        self.image_size = image_size
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.noise_seed + i)
        label = int(self.labels[i])
        s = self.image_size
        stripes = torch.sin(torch.arange(s, dtype=torch.float32) * (self.freqs[label] * math.pi / s))
        x = torch.randn(3, s, s, generator=g) + self.class_means[label] + stripes.view(1, 1, s)
        return x, label


class Cifar10(Dataset):
    """CIFAR-10 from its python pickles (cifar-10-python.tar.gz, extracted), as normalized float tensors."""

    def __init__(self, folder, split):
        folder = os.path.expanduser(folder)
        if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
            folder = os.path.join(folder, "cifar-10-batches-py")
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise UsageError(f"--data {folder}: CIFAR-10 files missing: {', '.join(missing)} (expected the python "
                             "version's data_batch_1..5 and test_batch, extracted from cifar-10-python.tar.gz; "
                             "nothing is downloaded)")
        images, labels = [], []
        for n in names:
            path = os.path.join(folder, n)
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data, batch_labels = batch[b"data"], batch[b"labels"]
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
                raise UsageError(f"--data: {path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
            images.append(torch.as_tensor(data, dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.extend(batch_labels)
        self.images = torch.cat(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        mean, std = torch.tensor(MEANS["cifar10"]), torch.tensor(STDS["cifar10"])
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)
        self.num_classes = 10

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - self.mean) / self.std, int(self.labels[i])


class Augmented(Dataset):
    """The paper's CIFAR augmentation on tensors (4-pixel zero padding, a random crop, a random horizontal flip),
    seeded per (seed, epoch, sample); set_epoch() before each epoch's loader is created."""

    def __init__(self, base, image_size, seed, pad=4):
        self.base, self.image_size, self.seed, self.pad = base, image_size, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, label = self.base[i]
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, i))
        s, pad = self.image_size, self.pad
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False)[0]
        x = F.pad(x, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
        x = x[:, top:top + s, left:left + s]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), label


class Resized(Dataset):
    def __init__(self, base, image_size):
        self.base, self.image_size = base, image_size

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, label = self.base[i]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        return x, label


class SeededTransform(Dataset):
    """An ImageFolder whose random transform is seeded per (seed, epoch, sample)."""

    def __init__(self, folder, transform, seed):
        self.folder, self.transform, self.seed = folder, transform, seed
        self.epoch = 0
        self.num_classes = len(folder.classes)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, self.epoch, i))
            return self.transform(image), label


def _image_folder(root, split, image_size, seed):
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise UsageError("--dataset imagefolder needs torchvision (pip install torchvision)") from None
    folder = os.path.join(os.path.expanduser(root), split)
    if not os.path.isdir(folder):
        raise UsageError(f"--data {root}: no {split}/ folder (expected {split}/<class>/<image> files)")
    normalize = transforms.Normalize(MEANS["imagenet"], STDS["imagenet"])
    if split == "train":
        transform = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), normalize])
    else:
        transform = transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                                        transforms.CenterCrop(image_size), transforms.ToTensor(), normalize])
    try:
        images = datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images in them
        raise UsageError(f"--data {root}: {split}/ holds no images in class folders ({e})") from None
    return SeededTransform(images, transform, seed)


def build_datasets(args):
    """(train, val, num_classes); train has set_epoch()."""
    if args.dataset == "synthetic":
        num_classes = 10
        train = SyntheticImages(args.synthetic_size, num_classes, args.image_size, args.seed, "train")
        val = SyntheticImages(max(args.synthetic_size // 4, 1), num_classes, args.image_size, args.seed, "val")
        return Augmented(train, args.image_size, args.seed), val, num_classes
    if args.dataset == "cifar10":
        if not os.path.isdir(os.path.expanduser(args.data)):
            raise UsageError(f"--data {args.data}: no such folder")
        train, val = Cifar10(args.data, "train"), Cifar10(args.data, "test")
        return Augmented(train, args.image_size, args.seed), Resized(val, args.image_size), 10
    if not os.path.isdir(os.path.expanduser(args.data)):
        raise UsageError(f"--data {args.data}: no such folder")
    train = _image_folder(args.data, "train", args.image_size, args.seed)
    val = _image_folder(args.data, "val", args.image_size, args.seed)
    if val.folder.classes != train.folder.classes:
        raise UsageError(f"--data {args.data}: train/ and val/ have different class folders")
    return train, val, train.num_classes


# ---------------------------------------------------------------------------------------------- model and schedule
def build_model(args, num_classes):
    torch.manual_seed(args.seed)
    if args.arch.startswith("cifar_resnet"):
        return fm.cifar_resnet(int(args.arch[len("cifar_resnet"):]), shortcut=args.shortcut, plain=args.plain,
                               num_classes=num_classes)
    if args.arch == "vgg19":
        return fm.vgg19(num_classes=num_classes, batch_norm=True)
    return getattr(fm, args.arch)(variant=args.variant, plain=args.plain, num_classes=num_classes)


def learning_rate(args, epoch):
    """The learning rate of (0-based) `epoch`: divided by 10 at each milestone passed."""
    return args.lr * 0.1 ** sum(epoch >= m for m in args.lr_milestones)


# ---------------------------------------------------------------------------------------------- output files
def _atomic_write(path, write):
    """write(file) into a temporary file next to `path`, flushed to disk, then renamed over `path`: a crash
    leaves the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    _atomic_write(path, lambda f: torch.save(state, f))


def write_csv(path, history):
    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(history)
        f.write(text.getvalue().encode())
    _atomic_write(path, write)


def plot_curves(path, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in history], style, marker="o", label=key)
        ax_err.plot(epochs, [100 * r[f"{key}_error"] for r in history], style, marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", yscale="log")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="error")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png", dpi=100)
    try:
        _atomic_write(path, write)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
class Dist:
    """The process's place in the job: torchrun's environment, or a single process."""

    def __init__(self, device_type):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if device_type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise UsageError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPUs: "
                                 "--nproc-per-node must not exceed the GPU count")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://")

    @property
    def main(self):
        return self.rank == 0

    def sum(self, values):
        """Sums a list of floats over the processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _loader(dataset, batch_size, sampler, args, generator, drop_last):
    # Training drops a short last batch (a batch of one would have no BatchNorm statistics).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers, drop_last=drop_last,
                      pin_memory=args.device == "cuda", generator=generator, persistent_workers=False)


def run_epoch(model, loader, optimizer, scaler, args, d, epoch, train):
    """One pass: (mean loss, error rate, images, seconds) over all processes."""
    device = d.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    amp = args.amp != "none"
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES.get(args.amp)) if amp else nullcontext()
    loss_sum = errors = seen = 0.0
    bar = None
    if args.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs} {'train' if train else 'val'}",
                   unit="batch", leave=False, dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast:
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
            n = y.shape[0]
            loss_sum += loss.item() * n
            errors += (out.argmax(1) != y).sum().item()
            seen += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{errors / seen:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    loss_sum, errors, seen, seconds = d.sum([loss_sum, errors, seen, seconds])
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"epoch {epoch + 1}: the {'training' if train else 'validation'} loss is not "
                                 "finite (learning rate too high?)")
    return loss_sum / max(seen, 1), errors / max(seen, 1), seen, seconds / d.world_size


def _config(args, world_size):
    cfg = {k: getattr(args, k) for k in RESUME_KEYS if k != "world_size"}
    cfg["world_size"] = world_size
    return cfg


def _load_resume(path, config):
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no {CHECKPOINT} in {os.path.dirname(path)} to continue from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a file that is not a checkpoint: say so rather than dump torch's traceback
        raise UsageError(f"--resume: {path} cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    saved = state.get("config", {})
    different = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {config[k]!r})" for k in RESUME_KEYS
                 if saved.get(k) != config[k]]
    if different:
        raise UsageError("--resume: the checkpoint was made with other settings: " + ", ".join(different))
    return state


def train(args):
    d = Dist(args.device)
    try:
        return _train(args, d)
    finally:
        d.close()


def _train(args, d):
    if args.batch_size % d.world_size:
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the number of processes "
                         f"({d.world_size})")
    if args.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    per_process = args.batch_size // d.world_size
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    config = _config(args, d.world_size)
    state = None
    if args.resume:
        state = _load_resume(ckpt_path, config)
    elif os.path.exists(ckpt_path):
        raise UsageError(f"--out {args.out} already holds a {CHECKPOINT}: pass --resume to continue that run, or "
                         "choose another --out")

    train_set, val_set, num_classes = build_datasets(args)
    if len(train_set) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} "
                         "images)")
    model = build_model(args, num_classes)
    if state is not None:
        model.load_state_dict(state["model"])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(d.device, memory_format=fmt)
    fastres.nn.set_memory_mode(model, args.memory)
    if args.sync_bn:
        model = fastres.nn.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type) if args.amp == "fp16" else None
    history, start_epoch = [], 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
    net = nn_parallel(model, d)

    train_sampler = DistributedSampler(train_set, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                       seed=args.seed, drop_last=True)
    # Validation: each process takes every world_size-th image, none twice (DistributedSampler would pad).
    val_indices = list(range(d.rank, len(val_set), d.world_size))
    if d.main:
        print(f"{PROG}: {args.arch} on {args.dataset} ({len(train_set)} train / {len(val_set)} val images, "
              f"{num_classes} classes), {d.world_size} process(es) x batch {per_process} on {d.device}, "
              f"amp {args.amp}, {'channels_last' if args.channels_last else 'NCHW'}"
              + (f", resuming after epoch {start_epoch}" if state is not None else ""), flush=True)
    if start_epoch >= args.epochs and d.main:
        print(f"{PROG}: the run already has {start_epoch} epochs (--epochs {args.epochs}): nothing to do")
    for epoch in range(start_epoch, args.epochs):
        if args.stop_after_epochs is not None and epoch >= args.stop_after_epochs:
            break
        lr = learning_rate(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loader_seed = torch.Generator().manual_seed(_sample_seed(args.seed, epoch, d.rank))
        model.train()
        train_loss, train_error, images, seconds = run_epoch(
            net, _loader(train_set, per_process, train_sampler, args, loader_seed, True), optimizer, scaler, args, d,
            epoch, train=True)
        model.eval()
        val_loader = _loader(torch.utils.data.Subset(val_set, val_indices), per_process, None, args, None, False)
        val_loss, val_error, _, _ = run_epoch(model, val_loader, None, None, args, d, epoch, train=False)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_error": train_error,
               "val_loss": val_loss, "val_error": val_error, "images_per_s": images / max(seconds, 1e-9),
               "epoch_s": seconds}
        history.append(row)
        if d.main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": None if scaler is None else scaler.state_dict(),
                                        "epoch": epoch + 1, "history": history, "config": config,
                                        "fastres_version": fastres.__version__})
            write_csv(os.path.join(args.out, "metrics.csv"), history)
            plot_curves(os.path.join(args.out, "curves.png"), history)
            print(f"epoch {epoch + 1}/{args.epochs}: lr {lr:g}, train loss {train_loss:.4f} error "
                  f"{100 * train_error:.2f}%, val loss {val_loss:.4f} error {100 * val_error:.2f}%, "
                  f"{row['images_per_s']:.1f} images/s", flush=True)
        if d.enabled:
            dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint is on disk
    return history


def nn_parallel(model, d):
    if not d.enabled:
        return model
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def main(argv=None):
    args = parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    try:
        train(args)
    except UsageError as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    except FloatingPointError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
