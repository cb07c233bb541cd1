"""One conv + norm (+ residual) (+ ReLU) unit, run through fastres.ops when a kernel covers it.

The bottom of fastres.nn's chain of modules (then the lean chain in _lean.py, SyncBatchNorm, the blocks, and the
converters in fastres._convert). Every layer of fastres (blocks, the ResNet stem, VGG features) runs its
convolutions through `conv_norm_act` (in _lean.py, since a synchronized BN's unit is a one-unit lean chain), which
decides per unit with the predicates here:
  * the norm is in eval mode (BatchNorm2d with running stats, FrozenBatchNorm2d) -> fold it into the conv
    (fastres.ops.fold_bn) and run fastres.ops.conv_bias_act; but a BatchNorm2d whose affine needs a grad runs
    as conv_bn_act(training=False) (see conv_norm_act);
  * the norm is nn.Identity or absent (e.g. after fastres.fold_bn) -> conv_bias_act with the conv's own bias;
  * the norm is a training-mode BatchNorm2d that tracks running stats -> fastres.ops.conv_bn_act(training=True);
  * anything else (padding modes, other norms, hooks, BN subclasses with their own forward), and
    everything under a torch.func transform (vmap, grad: see functorch_active) -> the plain modules, exactly as
    torchvision calls them.
"""
import math
import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from fastres import ops
from fastres.nn.frozen_bn import FrozenBatchNorm2d
from fastres.nn._collectives import is_sync_bn

_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def has_own_hooks(m):
    """Whether module `m` itself has hooks (forward, forward-pre, backward, backward-pre). Checked per module on
    every planned eval forward, hence the plain attribute reads."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks_set():
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_*_hook) are set."""
    return any(getattr(_module_globals, d, None) for d in _GLOBAL_HOOK_DICTS)


def has_hooks(m):
    """True when calling `m` would do more than its forward (hooks a fused kernel would skip)."""
    return has_own_hooks(m) or global_hooks_set()


def is_plain_relu(m):
    """An exact nn.ReLU without hooks: safe to fuse into a kernel's epilogue."""
    return type(m) is nn.ReLU and not has_hooks(m)


def conv_fusable(conv):
    """A Conv2d whose forward is a plain zero-padded convolution, grouped and dilated or not (what the kernels run)."""
    return (isinstance(conv, nn.Conv2d)
            and type(conv).forward is nn.Conv2d.forward
            and type(conv)._conv_forward is nn.Conv2d._conv_forward
            and not isinstance(conv, LazyModuleMixin)
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and not has_hooks(conv))


def _is_torchvision_frozen_bn(norm):
    cls = type(norm)
    return cls.__name__ == "FrozenBatchNorm2d" and cls.__module__.startswith("torchvision.")


def norm_kind(norm):
    """How a kernel can run `norm` after a conv: "none", "identity", "frozen", "bn_eval", "bn_train"; None if no
    kernel covers it (the module is called instead)."""
    if norm is None:
        return "none"
    if has_hooks(norm):
        return None
    if type(norm) is nn.Identity:
        return "identity"
    if (isinstance(norm, FrozenBatchNorm2d) and type(norm).forward is FrozenBatchNorm2d.forward) \
            or _is_torchvision_frozen_bn(norm):
        return "frozen"
    # fastres's SyncBatchNorm: the same kinds; in training the units reduce their statistics over its group.
    if (isinstance(norm, nn.BatchNorm2d) and type(norm).forward is _BatchNorm.forward
            and not isinstance(norm, LazyModuleMixin)) or is_sync_bn(norm):
        if norm.training:
            # Mirrors _BatchNorm.forward: without tracked stats the batch statistics are used and nothing is
            # updated, which conv_bn_act does not express.
            if norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None:
                return "bn_train"
            return None
        # eval: BatchNorm2d normalizes with the running stats whenever both exist.
        if norm.running_mean is not None and norm.running_var is not None:
            return "bn_eval"
        return None
    return None


def unit_fusable(conv, norm):
    """Whether a fastres kernel can run conv followed by norm."""
    if not conv_fusable(conv):
        return False
    kind = norm_kind(norm)
    if kind is None:
        return False
    if conv.bias is not None and (kind == "bn_train" or (kind == "bn_eval" and _affine_needs_grad(norm))):
        # conv_bn_act takes no conv bias. (A training BN cancels it in its output but not in running_mean, nor
        # in the bias's grad.) The modules run it.
        return False
    return True


def _affine(norm, ref):
    """BN weight and bias, or ones / zeros for affine=False."""
    weight, bias = norm.weight, norm.bias
    if weight is None:
        weight = torch.ones_like(ref)
    if bias is None:
        bias = torch.zeros_like(ref)
    return weight, bias


def _affine_needs_grad(norm):
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (norm.weight, norm.bias))


def norm_after_conv(norm, kind):
    """Whether conv_norm_act runs `norm` (of norm_kind `kind`) after the conv, through conv_bn_act, rather than
    folding it into the conv: a training BN, or an eval BN whose affine is being trained. Through a fold, gamma's
    grad is sum(dW' * W) + db' * (conv_bias - mean), two large terms that cancel whenever the conv outputs sit near
    the running mean, and it comes out several times less accurate than ATen's. A traced graph takes the fold
    whatever the grad mode (jit.trace checks its graph again under no_grad)."""
    return kind == "bn_train" or (kind == "bn_eval" and _affine_needs_grad(norm) and not torch.jit.is_tracing())


def _bn_momentum(bn):
    """The running-average factor _BatchNorm.forward uses, with its num_batches_tracked bookkeeping."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
        else:
            factor = bn.momentum
    return factor


# Source tensors up to this many elements (every BN parameter and running statistic of the ResNets, small convs)
# are compared whole; larger ones (conv weights) by a sample of _SAMPLED_ELEMENTS elements spread over them.
_WHOLE_ELEMENTS = 4096
_SAMPLED_ELEMENTS = 256
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Values derived from one unit's fold kept at once (casts, packed weights for distinct input shapes).
_MAX_DERIVED = 4
_MISSING = object()


class _Fingerprint:
    """The bytes of (a fixed sample of) a CPU tensor, read in place through numpy in about a microsecond.

    It keeps the tensor's storage alive, so an unchanged data_ptr means the same memory, never another allocation
    that reused the address. Bits are compared (NaN equals NaN; -0.0 differs from 0.0)."""

    __slots__ = ("_view", "_bytes")

    def __init__(self, t):
        bits = t.detach().view(_BITS_DTYPE[t.element_size()]).numpy()
        n = t.numel()
        if n > _WHOLE_ELEMENTS and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            # Evenly spread over the dense memory, with a step coprime to the element count so that the samples
            # fall on every residue of every inner dimension (no aliasing onto one input channel or one tap).
            step = n // _SAMPLED_ELEMENTS
            while math.gcd(step, n) != 1:
                step -= 1
            bits = np.lib.stride_tricks.as_strided(bits, shape=(_SAMPLED_ELEMENTS,),
                                                   strides=(step * t.element_size(),), writeable=False)
        self._view = bits
        self._bytes = bits.tobytes()

    def unchanged(self):
        return self._view.tobytes() == self._bytes


def _identity(t):
    # An inference tensor has no version counter (-1): its bytes alone show its in-place edits.
    return None if t is None else (id(t), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.shape,
                                   t.stride())


class FoldCache:
    """Folded (weight, bias) per unit, reused only while every source tensor is provably unchanged.

    Each source tensor (conv weight/bias, BN weight/bias/running_mean/running_var) is checked on every use by
      * its identity, data_ptr, shape, strides, dtype and _version (plus eps and inference mode): an optimizer step,
        load_state_dict, torch.nn.init, copy_ under no_grad, a running-statistic update, detach()-based edits (all
        bump _version), set_, `.data = ...` and a Parameter replaced by a new one are all seen;
      * and the bytes of its content: whole for tensors up to 4096 elements (so any change to a BN parameter or
        running statistic is seen), 256 elements spread over it for larger ones (conv weights), which catches the
        changes made through `.data` that bypass the version counter (EMA updates, pruning masks, init after a
        first eval) for about a microsecond per tensor.
    What it cannot see: an edit through `.data` (or another alias with its own version counter) that leaves all 256
    sampled elements of a conv weight of more than 4096 elements as they were, e.g. `w.data[3, 7, 1, 1] += 1`; the
    same in-place edit of an inference tensor (a model built or loaded under torch.inference_mode: such tensors
    keep no version counter, so their bytes alone show an edit, which only inference mode allows).
    fastres.refresh(model) forces a refold after such an edit.

    Only CPU tensors are cached, since their bytes can be read in place. On other devices reading them back would
    cost a synchronization and refolding is cheaper (about 50 us of GPU time for ResNet-50): they refold on every
    call. Weak references make sure a reused id() never aliases a freed tensor. It is filled only when no gradient
    can flow into the fold and never under torch.compile.

    With a fold an entry keeps what is derived from it (get_or_fold's `derive`): its cast to an autocast dtype, its
    weight prepacked in oneDNN's layout for one input shape and dtype. They are dropped with the fold, so they are
    exactly as fresh as it is; at most _MAX_DERIVED of them per unit, the oldest dropped first (each packed weight
    is a copy of the conv weight).
    """

    def __init__(self):
        self._entries = {}
        # A whole model's eval plan (fastres.models._eval_plan), kept by the model's root and dropped with the folds;
        # other_plan, its plan for calls with the other head setting (with its head, or without), kept beside.
        self.plan = self.other_plan = None

    def clear(self):
        self._entries.clear()
        self.plan = self.other_plan = None

    def __len__(self):
        return len(self._entries)

    @staticmethod
    def _key(sources, eps):
        return (eps, torch.is_inference_mode_enabled()) + tuple(_identity(t) for t in sources)

    def get_or_fold(self, name, sources, eps, fold, derived_key=None, derive=None):
        """fold(), reused while `sources` and eps are unchanged; with derive, derive(fold()) instead, reused while
        the fold is and kept per derived_key (the derivation's own parameters, e.g. dtype and input shape)."""
        key = self._key(sources, eps)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key or not all(
                (r is None and t is None) or (r is not None and r() is t) for r, t in zip(entry[1], sources)) \
                or not all(f.unchanged() for f in entry[2]):
            folded = fold()
            refs = tuple(None if t is None else weakref.ref(t) for t in sources)
            fingerprints = tuple(_Fingerprint(t) for t in sources if t is not None)
            entry = self._entries[name] = (key, refs, fingerprints, folded, {})
        if derive is None:
            return entry[3]
        derived = entry[4]
        value = derived.get(derived_key, _MISSING)  # (None is a value: "cannot be derived")
        if value is _MISSING:
            value = derive(entry[3])
            if len(derived) >= _MAX_DERIVED:
                try:
                    del derived[next(iter(derived))]  # the oldest
                except (KeyError, RuntimeError, StopIteration):  # another thread's forward evicted it first
                    pass
            derived[derived_key] = value
        return value

    def discard_derived(self, name, value):
        """Forgets unit `name`'s derived entries whose value is `value` or a tuple that starts with it (a packed
        weight and its bias): their holder no longer needs them, and the cache is not to keep them alive."""
        entry = self._entries.get(name)
        if entry is None:
            return
        derived = entry[4]
        for key, held in list(derived.items()):
            if held is value or (type(held) is tuple and held and held[0] is value):
                derived.pop(key, None)  # (another thread's forward may have evicted it first)

    # A cache must never travel with a copy or a pickle of its module: weakrefs cannot be pickled, and a copy's
    # tensors are different objects anyway.
    def __getstate__(self):
        return {"_entries": {}}

    def __setstate__(self, state):
        self.__init__()

    def __deepcopy__(self, memo):
        return FoldCache()


def refresh(model):
    """Forget every fold that `model`'s fastres modules cached, so that the next eval forward refolds each conv + BN
    pair from the current weights and running statistics. Needed only after an edit that the cache's cheap check
    cannot see (see FoldCache: a few elements of a large conv weight changed through `.data`); every other change
    is seen without it. Returns the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"refresh: model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        cache = m.__dict__.get("_fastres_fold_cache")
        if cache is not None:
            cache.clear()
    return model


def functorch_active():
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is running. fastres's modules then run their
    plain modules, as torchvision does (the reference), which every transform supports, instead of the fused ops."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _traced():
    """Whether torch.compile, torch.export or torch.jit.trace is recording: they see the fastres ops, never
    oneDNN's private ops on a packed weight."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or (exporting is not None and exporting())


def _cacheable(sources):
    if _traced():  # a trace records the fold from the parameters, not a cached result as a constant
        return False
    present = [t for t in sources if t is not None]
    if any(t.device.type != "cpu" for t in present):
        return False  # other devices refold (see FoldCache)
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in present)


def _fold_spec(conv, norm, kind):
    """(sources, eps, fold) of a unit's conv (weight, bias): the tensors the result depends on, and its
    computation."""
    if kind in ("none", "identity"):
        return (conv.weight, conv.bias), None, lambda: (conv.weight, conv.bias)
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    eps = float(norm.eps)

    def fold():
        weight_bn, bias_bn = _affine(norm, norm.running_var)
        return ops.fold_bn(conv.weight, conv.bias, weight_bn, bias_bn, norm.running_mean, norm.running_var, eps)

    return sources, eps, fold


def _cast_fp32(t, dtype):
    """t in dtype where autocast would cast it (an fp32 tensor), else t."""
    return t.to(dtype) if t is not None and t.dtype == torch.float32 and dtype is not None else t


def _conv_weight_layout(x):
    """The memory format ATen's CPU convolutions lay their weight out in for input x (suggest_memory_format's
    choice, which also reads the strides of size-1 dims: a [1, C, 1, 1] map with channels_last strides counts)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        if not x.is_contiguous() or x.stride() == (h * w * c, 1, w * c, c):
            return torch.channels_last
    return torch.contiguous_format


def folded_conv_params(conv, norm, kind, cache=None, name=None, like=None):
    """(weight, bias) of conv with an eval-mode norm folded in. With `like` (the conv's input) and a cached fold,
    the fold as the conv will use it, derived once and cached with it: its fp32 tensors cast to autocast's dtype
    where autocast is on (as the op's autocast would cast them on every call), the weight laid out in the input's
    memory format (which ATen's convolution would otherwise copy it into on every call). Without a cached fold,
    the fold itself (the op's autocast casts it)."""
    sources, eps, fold = _fold_spec(conv, norm, kind)
    if cache is None or not _cacheable(sources):
        return fold()
    dtype = fmt = None
    if like is not None:
        if torch.is_autocast_enabled(like.device.type) and any(
                t is not None and t.dtype == torch.float32 for t in sources[:2]):
            dtype = torch.get_autocast_dtype(like.device.type)
        layout = _conv_weight_layout(like)
        fmt = None if conv.weight.is_contiguous(memory_format=layout) else layout
    if dtype is None and fmt is None:
        return fold() if kind in ("none", "identity") else cache.get_or_fold(name, sources, eps, fold)

    def derive(folded):
        weight, bias = (_cast_fp32(t, dtype) for t in folded)
        return (weight if fmt is None else weight.contiguous(memory_format=fmt)), bias

    return cache.get_or_fold(name, sources, eps, fold, ("plain", dtype, fmt), derive)


def conv_geometry(conv):
    """(stride, padding, dilation, groups) of a Conv2d, as the kernels take them."""
    return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups


def packed_unit(x, conv, norm, kind, cache, name):
    """(backend, packed weight, bias, autocast dtype) to run conv (norm folded in) on x from a weight prepacked in
    oneDNN's blocked layout, or None where that path does not apply (the caller runs fastres.ops.conv_bias_act).

    It applies to an eval unit on CPU whose fold is cached (no gradient can reach the weights; not traced), under the
    automatic or the forced "cuda" backend (fastres._C's: a forced "torch" or "triton" backend runs its own), for a
    channels_last input that oneDNN can run in its dtype (fp32; bf16 where the CPU has oneDNN's bf16 kernels).
    The packed weight is cached with the fold (FoldCache) per input shape and dtype, the two things oneDNN's choice
    of layout depends on, so it is never stale; under autocast the fp32 fold is cast once, before packing."""
    if cache is None or x.device.type != "cpu" or _traced():
        return None
    backend = ops.select("conv_bias_act", x.device)
    if not hasattr(backend, "prepacked_conv_bias_act"):
        return None
    sources, eps, fold = _fold_spec(conv, norm, kind)
    if not _cacheable(sources):
        return None
    autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    dtype = x.dtype if autocast_dtype is None or x.dtype != torch.float32 else autocast_dtype
    weight_dtype = conv.weight.dtype if autocast_dtype is None or conv.weight.dtype != torch.float32 \
        else autocast_dtype
    if weight_dtype != dtype or not backend.packable(x, dtype):
        return None  # mixed dtypes: the op reports them
    geometry = conv_geometry(conv)

    def pack(folded):
        weight, bias = (_cast_fp32(t, autocast_dtype) for t in folded)
        packed = backend.pack_conv_weight(weight, *geometry, x.shape)
        return None if packed is None else (packed, bias)

    # A Winograd transform is the same for every input shape that takes it: one entry for all of them (a detector's
    # RPN head runs one convolution at five shapes, which, one entry each, outnumbered the entries kept and were
    # packed again on every forward). (dtype fp32: the conv's own weight is fp32, the fold pack() transforms.)
    winograd = dtype == torch.float32 and backend.winograd_chosen(conv.weight, geometry, x.shape)
    packed = cache.get_or_fold(name, sources, eps, fold,
                               ("packed", dtype, "winograd" if winograd else tuple(x.shape), *geometry), pack)
    return None if packed is None else (backend, packed[0], packed[1], autocast_dtype)


def prepacked_conv_norm_act(x, conv, norm, kind, residual, relu, cache, name, residual_owned=False):
    """relu?(conv(x) with norm folded in + residual?) from a conv weight prepacked once (packed_unit), or None where
    that path does not apply (the caller runs fastres.ops.conv_bias_act). residual_owned: nothing but the caller
    holds `residual` (it made it), so the result may be written over it. Not for an input that needs a gradient:
    oneDNN's op has no autograd formula. Autocast's casts happen here as its registration for conv_bias_act does
    them: an fp32 x or residual is cast (the fold was cast once, before packing)."""
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        return None  # an input gradient through a frozen model
    unit = packed_unit(x, conv, norm, kind, cache, name)
    if unit is None:
        return None
    return run_packed(unit, x, conv_geometry(conv), residual, relu, residual_owned)


def run_packed(unit, x, geometry, residual, relu, residual_owned):
    """A packed_unit's conv on x (geometry: conv_geometry's), or None where oneDNN refuses it."""
    backend, packed, bias, autocast_dtype = unit
    x, cast = _cast_fp32(x, autocast_dtype), _cast_fp32(residual, autocast_dtype)
    return backend.prepacked_conv_bias_act(x, packed, bias, *geometry, cast, relu,
                                           residual_owned or cast is not residual)


def keep_memory_format(out, like):
    """`out` laid out like `like` (channels_last in -> channels_last out); under a torch.func transform, which
    cannot query memory formats, `out` as it is."""
    if functorch_active():
        return out
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        fmt = torch.contiguous_format
    if not out.is_contiguous(memory_format=fmt):
        out = out.contiguous(memory_format=fmt)
    return out


class FusedModuleMixin:
    """Gives a module a fold cache, emptied on .to()/.half()/.cuda() (the parameters get new storage, which could
    reuse a freed address) and on .train() (nothing is folded in training: free the memory), and not shared
    between DataParallel replicas."""

    def _init_fold_cache(self):
        self._fastres_fold_cache = FoldCache()

    def _fused_units(self):
        """[(conv, norm)]: the units this module runs through conv_norm_act (norm None: a conv on its own), for
        fastres.convert_report. By default its `_conv_norm_pairs` (which fastres.fold_bn folds too)."""
        return [(getattr(self, c), getattr(self, n)) for c, n in getattr(self, "_conv_norm_pairs", ())]

    @property
    def fold_cache(self):
        cache = self.__dict__.get("_fastres_fold_cache")
        if cache is None:
            cache = self.__dict__["_fastres_fold_cache"] = FoldCache()
        return cache

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling: fastres modules pick their kernels in
        # Python (per unit, per mode), which TorchScript's language cannot express.
        raise TypeError(
            f"torch.jit.script cannot compile fastres's {type(self).__name__}: its forward chooses kernels in Python. "
            "Use torch.jit.trace(model.eval(), example) or torch.export.export(model, (example,)) (both keep the "
            "fused ops), or script fastres.fold_bn(model.eval(), plain=True), a plain-torch copy.")

    def _apply(self, fn, *args, **kwargs):
        self.fold_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode=True):
        if mode:
            self.fold_cache.clear()
        return super().train(mode)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._fastres_fold_cache = FoldCache()
        return replica
