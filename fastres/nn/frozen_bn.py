"""FrozenBatchNorm2d: BatchNorm2d with fixed statistics and affine (detection fine-tuning), and freeze_bn()."""
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenBatchNorm2d(nn.Module):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, with all four tensors buffers.

    A fresh layer equals a fresh nn.BatchNorm2d in eval mode. It loads BatchNorm2d state_dicts as they are: their
    num_batches_tracked is dropped. Inside fastres blocks it is folded into the preceding convolution.
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"FrozenBatchNorm2d: num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"FrozenBatchNorm2d: eps must be > 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # BatchNorm2d checkpoints carry num_batches_tracked; a frozen layer has no use for it.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def scale_shift(self):
        """(scale, shift) per channel, computed in fp32 whatever the buffers' dtype."""
        scale = self.weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
        shift = self.bias.float() - self.running_mean.float() * scale
        return scale, shift

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"FrozenBatchNorm2d: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d: input has {x.shape[1]} channels but num_features is "
                             f"{self.num_features}")
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn):
        """A FrozenBatchNorm2d with `bn`'s statistics, affine (ones / zeros when affine=False) and eps."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"FrozenBatchNorm2d.from_batchnorm: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("FrozenBatchNorm2d.from_batchnorm: bn has no running statistics "
                             "(track_running_stats=False): there is nothing to freeze")
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            stats = bn.running_mean
            frozen.running_mean = bn.running_mean.detach().clone()
            frozen.running_var = bn.running_var.detach().clone()
            frozen.weight = (bn.weight.detach().clone() if bn.weight is not None
                             else torch.ones_like(stats))
            frozen.bias = (bn.bias.detach().clone() if bn.bias is not None
                           else torch.zeros_like(stats))
        frozen.train(bn.training)
        return frozen


def freeze_bn(model):
    """Replace every nn.BatchNorm2d in `model` (the root included) by a FrozenBatchNorm2d with the same statistics,
    affine and eps. In place; returns the model (the new layer when `model` itself is a BatchNorm2d).

    A module shared at several places stays shared. BatchNorm2d subclasses that override forward (e.g. a BN with a
    fused activation) are refused rather than silently losing what their forward adds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_bn: model must be an nn.Module, got {type(model).__name__}")
    memo = {}

    def frozen_of(bn, where):
        if id(bn) not in memo:
            if type(bn).forward is not _BatchNorm.forward:
                raise TypeError(f"freeze_bn: {where} is a {type(bn).__name__}, a BatchNorm2d subclass with its own "
                                "forward; freezing it would drop what that forward does")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"freeze_bn: {where} has no running statistics (track_running_stats=False)")
            memo[id(bn)] = FrozenBatchNorm2d.from_batchnorm(bn)
        return memo[id(bn)]

    if isinstance(model, nn.BatchNorm2d):
        return frozen_of(model, "model")

    def walk(module, path):
        for name, child in module.named_children():
            where = f"{path}.{name}" if path else name
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, frozen_of(child, where))
            else:
                walk(child, where)

    walk(model, "")
    return model
