"""examples/train.py: a two-process DDP smoke run under torchrun (gloo, CPU, synthetic data, SyncBN), resume after
an interruption giving bitwise the weights of an uninterrupted run, crash-safe checkpoint writes, the CIFAR-10 and
ImageFolder readers, and clear messages (not tracebacks) for bad arguments and missing data."""
import csv
import importlib.util
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train.py")
# A tiny run: CIFAR ResNet-8 on 16x16 synthetic images, 3 steps per epoch, no loader processes.
TINY = ["--arch", "cifar_resnet8", "--image-size", "16", "--synthetic-size", "48", "--batch-size", "16",
        "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("fastres_example_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path):
    return torch.load(os.path.join(path, "checkpoint.pt"), map_location="cpu", weights_only=False)


def read_csv(path):
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_an_interruption_is_bitwise_the_uninterrupted_run(train, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(TINY + ["--epochs", "2", "--lr-milestones", "1", "--out", whole])
    train.main(TINY + ["--epochs", "2", "--lr-milestones", "1", "--out", split, "--stop-after-epochs", "1"])
    assert load(split)["epoch"] == 1 and len(read_csv(split)) == 1
    train.main(TINY + ["--epochs", "2", "--lr-milestones", "1", "--out", split, "--resume"])
    a, b = load(whole), load(split)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a["model"], b["model"])  # weights, running statistics, num_batches_tracked
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["lr"] for r in a["history"]] == [0.1, pytest.approx(0.01)]
    for ra, rb in zip(a["history"], b["history"]):  # the same losses and errors, step for step
        assert {k: ra[k] for k in ("train_loss", "train_error", "val_loss", "val_error")} == \
               {k: rb[k] for k in ("train_loss", "train_error", "val_loss", "val_error")}
    rows = read_csv(split)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    with open(os.path.join(split, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_write_is_atomic(train, tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    train.save_checkpoint(path, {"epoch": 1})

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        train._atomic_write(path, crash)
    assert torch.load(path)["epoch"] == 1  # the previous checkpoint, whole
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_resume_refusals(train, tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="--resume: no checkpoint.pt"):
        train.main(TINY + ["--out", out, "--resume"])
    train.main(TINY + ["--epochs", "1", "--out", out])
    with pytest.raises(SystemExit, match="already holds a checkpoint.pt: pass --resume"):
        train.main(TINY + ["--epochs", "1", "--out", out])
    with pytest.raises(SystemExit, match=r"other settings: --batch-size 16 \(now 8\)"):
        train.main(TINY + ["--batch-size", "8", "--epochs", "2", "--out", out, "--resume"])
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read as a checkpoint"):
        train.main(TINY + ["--epochs", "2", "--out", out, "--resume"])


# ------------------------------------------------------------------------------------------------ data
def _write_cifar(folder, per_batch=8):
    os.makedirs(folder)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (per_batch,), generator=g).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)


def test_cifar10_python_pickles(train, tmp_path):
    data = str(tmp_path / "cifar")
    _write_cifar(os.path.join(data, "cifar-10-batches-py"))
    train_set, val_set, classes = train.build_datasets(train.parse_args(
        ["--dataset", "cifar10", "--data", data, "--out", str(tmp_path / "o")]))
    assert (len(train_set), len(val_set), classes) == (40, 8, 10)
    x, y = train_set[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    out = str(tmp_path / "run")
    train.main(["--dataset", "cifar10", "--data", data] + TINY[2:] + ["--epochs", "1", "--out", out])
    assert len(read_csv(out)) == 1


def test_imagefolder(train, tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "data" / split / cls)
            for i in range(8 if split == "train" else 2):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / cls / f"{i}.png")
    out = str(tmp_path / "run")
    train.main(["--dataset", "imagefolder", "--data", str(tmp_path / "data"), "--arch", "cifar_resnet8",
                "--image-size", "16", "--batch-size", "8", "--workers", "0", "--epochs", "1", "--no-progress",
                "--out", out])
    assert load(out)["model"]["fc.weight"].shape == (2, 64)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet51"], "--arch: unknown architecture 'resnet51'"),
    (["--arch", "cifar_resnet21"], "depth 6n+2"),
    (["--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["--lr", "fast"], "--lr: expected a number"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data"),
    (["--data", "/somewhere"], "--data is not used with --dataset synthetic"),
    (["--lr-milestones", "3,x"], "--lr-milestones must be comma-separated epochs"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a GPU"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
])
def test_bad_arguments_are_named(train, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", "unused"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_is_a_message_not_a_traceback(train, tmp_path):
    with pytest.raises(SystemExit, match=r"--data .*nope: no such folder"):
        train.main(["--dataset", "cifar10", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"CIFAR-10 files missing: data_batch_1.*nothing is downloaded"):
        train.main(["--dataset", "cifar10", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"no train/ folder"):
        train.main(["--dataset", "imagefolder", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="larger than the training set"):
        train.main(TINY + ["--batch-size", "64", "--out", str(tmp_path / "o2")])


# ------------------------------------------------------------------------------------------------ DDP
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_smoke_run_under_torchrun(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), SCRIPT] + TINY + [
           "--epochs", "2", "--sync-bn", "--progress", "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x batch 8 on cpu" in proc.stdout
    assert proc.stdout.count("epoch 2/2:") == 1  # one process reports
    rows = read_csv(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert all(float(r[k]) == float(r[k]) for k in r)  # no NaN
        assert 0 <= float(r["train_error"]) <= 1 and float(r["images_per_s"]) > 0
    state = load(out)
    assert state["config"]["world_size"] == 2 and state["config"]["sync_bn"]
    assert not any(k.startswith("module.") for k in state["model"])  # loads into a plain model
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
