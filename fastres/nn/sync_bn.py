"""SyncBatchNorm over torch.distributed, for fastres blocks and on its own, on NCCL and on gloo (CPU tensors).

    model = fastres.nn.convert_sync_batchnorm(model)          # before wrapping in DistributedDataParallel
    model = torch.nn.parallel.DistributedDataParallel(model)

In training, every converted BatchNorm normalizes with the statistics of the whole process group's batch: a step
on k processes with batch B each gives the outputs, gradients and running statistics of one process on the k*B
batch (DistributedDataParallel averaging the parameter gradients as usual). Per BN layer and step it costs one
collective in forward (all_gather of each process's count, mean and centred sum of squares, merged the same way
on every process) and one in backward (all_reduce of sum(dz) and sum(dz * xhat)).

Inside fastres blocks the BN layers keep running fused with their convolution, ReLU and residual (see
fastres.nn._lean); outside them SyncBatchNorm runs on its own. Without an initialized process group, or in a group
of one, it is exactly nn.BatchNorm2d.
"""
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from fastres.nn import _lean
from fastres.nn._collectives import all_reduce_sums, gather_stats, group_of  # noqa: F401  (re-exported)

# The BatchNorm classes whose forward is exactly a batch normalization: safe to convert. A subclass may do more in
# forward (timm's BatchNormAct2d applies an activation): converting it to a plain SyncBatchNorm would silently
# drop that, which is the trap PyTorch's and timm's converters fell into.
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over N and the spatial dims of the whole process group's batch (2-D to 5-D inputs).

    Same constructor, parameters, buffers and state_dict keys as nn.BatchNorm2d, plus `process_group` (None: the
    default group, looked up at each forward). Eval mode and runs outside an initialized group are nn.BatchNorm's.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected a 2-D to 5-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: input has {input.shape[1]} channels (input.shape[1]) but the layer "
                             f"has num_features={self.num_features}")
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        group = group_of(self) if batch_stats else None
        if group is None:
            return super().forward(input)  # nn.BatchNorm's own forward, num_batches_tracked included
        return _lean.sync_batch_norm(input, self, group)


# How the modules below this one (the per-unit math, the lean chain) recognize this exact class without importing it.
SyncBatchNorm._fastres_synced = True


def convert_sync_batchnorm(module, process_group=None):
    """Replaces every BatchNorm1d/2d/3d (and torch.nn.SyncBatchNorm) in `module` (recursively, the root included)
    by a fastres.nn.SyncBatchNorm over `process_group` (None: the default group), in place, keeping its
    parameters, buffers, hooks and training flag (the very same tensors: optimizer state stays valid). Returns the
    module (the new layer when `module` itself is a BatchNorm).

    fastres blocks keep fusing the converted layers with their convolutions, ReLUs and residuals. BatchNorm
    subclasses are refused with a TypeError rather than converted: their forward may do more than normalize (an
    activation, say) and a plain SyncBatchNorm would silently drop it. FrozenBatchNorm2d has no batch statistics
    and is left as it is.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: module must be an nn.Module, got {type(module).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"convert_sync_batchnorm: process_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    memo = {}

    def converted(m, name):
        if not isinstance(m, _BatchNorm):
            return None
        if id(m) in memo:
            return memo[id(m)]
        if isinstance(m, LazyModuleMixin):
            raise TypeError(f"convert_sync_batchnorm: {name or 'the module'} is an uninitialized "
                            f"{type(m).__name__}; run one forward first so that its parameters exist")
        if type(m) is SyncBatchNorm:
            m.process_group = process_group
            new = m
        elif type(m) in _CONVERTIBLE:
            new = SyncBatchNorm.__new__(SyncBatchNorm)
            new.__dict__.update(m.__dict__)  # the same parameters, buffers, hooks and flags
            new._modules = m._modules.copy()
            new._parameters = m._parameters.copy()
            new._buffers = m._buffers.copy()
            new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
            new.process_group = process_group
        else:
            raise TypeError(f"convert_sync_batchnorm: {name or 'the module'} is a {type(m).__module__}."
                            f"{type(m).__qualname__}, a BatchNorm subclass whose forward may do more than "
                            "normalize (e.g. a fused activation) that a conversion would drop; replace it by "
                            "fastres.nn.SyncBatchNorm plus its extra step yourself")
        memo[id(m)] = new
        return new

    def walk(parent, prefix):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}{name}"
            new = converted(child, path)
            if new is not None:
                parent._modules[name] = new
            else:
                walk(child, path + ".")

    root = converted(module, "")
    if root is not None:
        return root
    walk(module, "")
    return module
