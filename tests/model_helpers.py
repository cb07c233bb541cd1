"""Helpers the model-level tests share: random BN state, a count of the blocks that trained through the lean
chain, and a plain (ATen) forward of the CIFAR nets."""
import torch
from torch import nn
from torchvision.models import resnet as tvr
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

from fastres.nn import FrozenBatchNorm2d, _lean


def randomize_(model, seed=1):
    """Random BN statistics, affine and num_batches_tracked (and GroupNorm affine), so that folding and running
    averages matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, TorchvisionFrozenBN)):
                c = m.running_mean.shape[0] if m.running_mean is not None else m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(3)
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.5)
    return model


def count_lean_blocks(monkeypatch):
    """A list that gets, for every call of the lean training chain, whether it ran (returned a result)."""
    calls, real = [], _lean.block_forward

    def counting(block, x):
        out = real(block, x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_lean, "block_forward", counting)
    return calls


def torchvision_style_cifar_forward(model, x):
    """A fastres CIFAR net run with torchvision's BasicBlock.forward on its blocks (the attribute names match): its
    own modules, ATen's ops. Bind it to a copy: copy.forward = types.MethodType(torchvision_style_cifar_forward,
    copy)."""
    x = model.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3):
        for b in stage:
            if b.residual:
                x = tvr.BasicBlock.forward(b, x)
            else:
                x = b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))
    return model.fc(torch.flatten(model.avgpool(x), 1))
