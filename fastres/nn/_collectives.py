"""The collectives of fastres.nn.SyncBatchNorm, at the bottom of fastres.nn's chain of modules (the per-unit math,
the lean chain and the SyncBatchNorm module itself all build on it)."""
import torch
import torch.distributed as dist


def is_sync_bn(norm):
    """Whether `norm` is exactly a fastres.nn.SyncBatchNorm (a subclass may have its own forward), recognized by the
    marker that sync_bn.py sets on that class alone, since sync_bn.py builds on the modules that ask."""
    return type(norm).__dict__.get("_fastres_synced", False) is True


def group_of(norm):
    """The process group `norm` synchronizes over, or None when it runs locally (not a SyncBatchNorm, no
    initialized default group, or a group of one process)."""
    if not is_sync_bn(norm) or not dist.is_available() or not dist.is_initialized():
        return None
    group = norm.process_group
    if group is None:
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


# torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_stats(mean, var, count, group):
    """(mean, biased var, total count) of the group's batch from each process's per-channel mean, biased variance
    and count, in ONE collective. The per-process moments are merged in float64 (Chan et al.'s pairwise formula:
    no sum-of-squares cancellation), in rank order, so every process gets the same numbers."""
    local = torch.stack([torch.full_like(mean, float(count), dtype=torch.float64), mean.double(),
                         var.double() * count])
    world = dist.get_world_size(group)
    # Concatenated along dim 0 (the form every backend accepts, gloo included), then one row block per process.
    gathered = torch.empty((world * 3, local.shape[1]), dtype=local.dtype, device=local.device)
    _all_gather_single(gathered, local, group=group)
    counts, means, m2s = gathered.view(world, 3, -1).unbind(1)
    total = counts.sum(0)
    safe_total = total.clamp_min(1)  # a group whose every batch is empty: zeros rather than NaN
    merged_mean = (counts * means).sum(0) / safe_total
    merged_var = (m2s.sum(0) + (counts * (means - merged_mean) ** 2).sum(0)) / safe_total
    return merged_mean.to(mean.dtype), merged_var.to(var.dtype), total.to(mean.dtype)


def all_reduce_sums(sums, group):
    """Sums a tensor of per-channel partial sums over the group, in place: ONE collective."""
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums
