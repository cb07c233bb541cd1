"""The CPU eval forward of fastres.models.ResNet and CifarResNet (and, after fastres.convert, timm's ResNet: its forward
with its head, where that is an average pool and a linear, and its forward_features; the features of transformers'
ResNetModel and ResNetBackbone with or without hidden states, and torchvision's detection / segmentation backbone
body) as a plan: its units decided once, then run as a flat loop of oneDNN calls on prepacked weights. A model called
both with its head and without keeps a plan for each (FoldCache.plan and other_plan).

At batch 1 on CPU the per-unit path (fastres.nn._lean.conv_norm_act) is bound by Python: every call re-decides each
unit (which kernel, whether its fold and packed weight are still fresh), about 150 us a unit, some 8 ms of a
ResNet-50 forward. The plan makes those decisions once per model state and replays them. Before every forward it
checks, in one pass, that nothing they rest on has changed:
  * every module of the model: the same class, eval mode, no hooks, the same children, parameters and buffers (the
    same objects); the conv geometry, norm eps and block flags its units were built from;
  * every tensor a fold reads, as FoldCache checks it (version counter, data pointer, shape, strides, dtype, a
    fingerprint of its bytes), and that none requires a gradient where autograd is on;
  * the call: the input's shape and dtype, autocast, inference and grad mode, the selected backend (the plan keeps
    its packed weights per such key), no global hooks, no trace or torch.func transform.
The first two run in C++ (csrc/plan_guard.cpp): in Python they cost about 0.5 ms a forward, a tenth of a CIFAR
ResNet's at batch 1. For ResNet-50 they now take about 0.3 ms with warm caches and 0.9 ms inside a forward, whose
convolutions have evicted the tensors they read (1% of the forward at batch 1).
When anything has changed it is rebuilt; where it does not apply (hooks, training, a module it does not know) the
per-unit path runs. Under autograd (an eval forward whose input or parameters want gradients) the plan's output
carries a node whose backward recomputes the forward through the per-unit path (_PlannedForward); once a model has
been differentiated so, it takes the per-unit path under autograd directly. A unit the packed path cannot run
(refused by oneDNN, a dtype without oneDNN kernels) runs through conv_norm_act inside the plan. The results are
those of the per-unit path: the same calls on the same packed weights (but for the graph body below, whose
kernels may round their own way, within the tolerance rule). Under autocast the classifier's weight is
cast once per plan, not on every call (in bf16 also packed for oneDNN's linear: _ClassifierLinear), and the input's
cast and channels_last copy are one pass. A max pool after the stem runs with the stem's ReLU as one pass
(fastres.ops.max_pool_relu's kernel: ReLU commutes with max; ATen's pool also writes argmax indices).
Once a forward of an input key has run every unit from its packed weight, the body (stem to last block) runs as one
C++ call, fastres::_run_plan (csrc/cpu_plan.cpp): the same calls without the Python around each (~20 us a unit).
In fp32 and bf16 (a bf16 model, or autocast to bf16 computed in bf16), once that call has run GRAPH_AFTER times for
an input key, the body becomes a oneDNN Graph (TorchScript's fusion of the frozen graph of the same units), which
keeps what each oneDNN call otherwise rebuilds (GRAPH_BODY), and ends with the classifier where it is a global
average pool and a linear (GRAPH_HEAD). In every form of the body
(the packed units, the one-call body, the graph) the larger 3x3 convolutions of stride 1 run as Winograd's F(2x2, 3x3)
(fastres._C's _winograd_conv3x3; fastres.ops.backend_cuda's rule decides which): 16 products per output tile where
oneDNN's direct kernels take 36 (in the graph, between its partitions).
Under autocast to a reduced dtype (bf16, fp16) with fp32 weights and input, on a CPU whose convolutions in that
dtype are slower than in fp32 (AVX512-BF16 without AMX: 1.3-1.9x slower per ResNet-50 layer, 1.7x in all, on an
Intel Xeon), the plan runs the fp32 body and hands back its output in autocast's dtype, as autocast's forward
would (see autocast_computes_in_fp32; FASTRES_CPU_AUTOCAST).
fastres.models.VGG's eval forward has a plan of its own (_SequentialPlan, the same guard): its features alone, as one
oneDNN Graph (fp32 or bf16) once a key has run GRAPH_AFTER forwards, its classifier the model's modules; everything
else (the first forwards, fp16, a NaN that met a ReLU) is its per-unit forward (5% faster at batch 1 and 2% at batch 8
for VGG-19 on an Intel Xeon, ad-hoc A/B in one process).
"""
import collections
import contextlib
import contextvars
import copy
import io
import os
import threading
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fastres import ops
from fastres.models import _malloc, _threads
from fastres.ops import _compiled
from fastres._convert.torchvision import Sequential as FusedSequential
from fastres.nn._fused import _MAX_DERIVED, _SAMPLED_ELEMENTS, _WHOLE_ELEMENTS, _cacheable, _cast_fp32, \
    _fold_spec, _traced, conv_geometry, folded_conv_params, functorch_active, global_hooks_set, has_own_hooks, \
    is_plain_relu, keep_memory_format, norm_after_conv, norm_kind, packed_unit, run_packed, unit_fusable
from fastres.nn._lean import conv_norm_act, sequence_units
from fastres.nn.blocks import _FusedBlock

_UNRESOLVED = object()
# A `stages` key's body once every unit ran from its packed weight: it may have a graph (it has no _run_plan body).
_ALL_PACKED = object()
# A key's _run_plan body whose packed weights were dropped once its graph ran (_Plan._drop_unit_packs).
_DROPPED = object()
# The plan's guard (csrc/plan_guard.cpp); None with a fastres._C built without it, where no plan runs.
if all(hasattr(_compiled._C, f) for f in ("_tensor_state_guard", "_module_signature", "_plan_changed")):
    # sampling the tensors' bytes as FoldCache's fingerprints do
    def _TENSOR_STATE(tensors):
        return _compiled._C._tensor_state_guard(tensors, _WHOLE_ELEMENTS, _SAMPLED_ELEMENTS)

    _MODULE_SIGNATURE = _compiled._C._module_signature
    _PLAN_CHANGED = _compiled._C._plan_changed
else:
    _TENSOR_STATE = _MODULE_SIGNATURE = _PLAN_CHANGED = None
_MAX_POOL_RELU = torch.ops.fastres._max_pool_relu.default if _compiled.has_op("_max_pool_relu") else None
# oneDNN's linear on a weight packed once (_ClassifierLinear)
_LINEAR_PACKED = all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")) and \
    torch.backends.mkldnn.is_available()
# The plan's body as one call (csrc/cpu_plan.cpp), once every unit of a key runs from its packed weight.
_RUN_PLAN = torch.ops.fastres._run_plan.default if _compiled.has_op("_run_plan") else None
# FE_INVALID on every thread of ATen's pool, cleared and read (csrc/cpu_plan.cpp), around the graph body below.
_FE_INVALID = (torch.ops.fastres._fe_invalid_clear.default, torch.ops.fastres._fe_invalid_raised.default) \
    if _compiled.has_op("_fe_invalid_clear") else None
# The body as a oneDNN Graph: TorchScript's fusion (torch.jit.enable_onednn_fusion) compiles the frozen graph of the
# units' convolutions, bias, residual adds and ReLUs into oneDNN Graph partitions and keeps them between calls, where
# each of _run_plan's oneDNN calls has PyTorch build its primitive descriptor again (at batch 1 on an Intel Xeon:
# 32 ms a ResNet-50 forward against 40; bf16 autocast on an AMD EPYC with AVX512-BF16: 22.9 against 25.9 ms). fp32
# and bf16 (_graph_dtype), after GRAPH_AFTER one-call bodies of the same input key (a key called once or twice never
# pays for the trace, ~1 s). FASTRES_CPU_GRAPH=0 turns it off.
GRAPH_BODY = (os.environ.get("FASTRES_CPU_GRAPH", "1") != "0" and _FE_INVALID is not None
              and hasattr(torch.jit, "enable_onednn_fusion") and torch.backends.mkldnn.is_available())
GRAPH_AFTER = 2
# In the graph body, the larger 3x3 convolutions of stride 1 as Winograd's F(2x2, 3x3), by the rule the packed path
# follows too (fastres.ops.backend_cuda: winograd_applies, winograd_pays; FASTRES_CPU_WINOGRAD=0 turns it off), on a
# transform of the unit's fold shared by the plan's graphs (_Plan.winograd_weight).
_WINOGRAD_CONV = torch.ops.fastres._winograd_conv3x3.default if _compiled.has_op("_winograd_conv3x3") else None
try:
    from fastres.ops import backend_cuda as _cpu_backend
except ImportError:  # fastres._C not built: no plan
    _cpu_backend = None
# The classifier (global average pool, linear) inside the graph: the features never come back to Python, and the
# linear is one of the graph's partitions. Ad-hoc A/B on an Intel Xeon, one process: ResNet-50 at batch 1 about
# 0.2 ms off 29 ms (within the machine's noise), CIFAR ResNet-56 0.05 of 1.74 ms at batch 1 and 0.07 of 6.9 at 8.
GRAPH_HEAD = True
# The graph executor profiles a graph's first calls before it fuses: made when the graph is built, not in a forward.
_GRAPH_WARM_CALLS = 3
# Forwards in a row that meet a NaN (and so run the graph, then _run_plan) before a key drops its graph.
_GRAPH_MISSES = 3
# Under autocast, whether the plan computes in fp32 (FASTRES_CPU_AUTOCAST): "auto" where this CPU's convolutions in
# autocast's dtype take more than AUTOCAST_FP32_ABOVE times their fp32 time (measured once per process, dtype and
# thread count), "fp32" always, "autocast" never (autocast's dtype, as ATen would compute it). The margin keeps the
# choice, and so the numerics, from flipping with timing noise: CPUs differ by far more (bf16 at 0.57x fp32's time
# on an AMD EPYC with AVX512-BF16, 1.6-1.8x on an Intel Xeon with it and no AMX).
AUTOCAST_MODES = ("auto", "fp32", "autocast")
AUTOCAST_FP32_ABOVE = 1.25
_AUTOCAST_PROBED = {}  # (dtype, threads) -> reduced-over-fp32 time ratio
# Block forwards that, in eval with plain ReLUs, run exactly _FusedBlock.forward's units (fastres._convert.timm adds
# its blocks' forward): a block class with any other forward is not planned.
PLANNABLE_BLOCK_FORWARDS = {_FusedBlock.forward}


class _Unit:
    """One conv (+ folded norm) (+ ReLU) of the plan, and what the per-unit path needs to run it."""

    __slots__ = ("conv", "norm", "kind", "cache", "name", "relu", "geometry")

    def __init__(self, conv, norm, kind, cache, name, relu):
        self.conv, self.norm, self.kind, self.cache, self.name, self.relu = conv, norm, kind, cache, name, relu
        self.geometry = conv_geometry(conv)


# The attributes each kind of module's part in the plan is built from, in the guard.
_CONV_ATTRIBUTES = ("stride", "padding", "dilation", "groups", "padding_mode")
_MAX_POOL_ATTRIBUTES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ATTRIBUTES = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_PAD_ATTRIBUTES = ("stride", "in_channels", "out_channels")


def _immutable(value):
    return type(value) in (int, float, bool, str, type(None)) or \
        (type(value) is tuple and all(_immutable(v) for v in value))


def _recorded(value):
    """An attribute's value as the guard keeps it: itself where immutable (so that identity alone proves it
    unchanged), else a copy (an edit in place of a list would not change its identity)."""
    return value if _immutable(value) else copy.deepcopy(value)


class _Plan:
    """The units of one ResNet in forward order, the state they were decided from, and their packed weights per
    input key. The model describes its body as `_plan_spec()` -> (stem, pool, layers), or None where it is not
    plannable now: stem [(conv, norm, relu, name)], units that run one after another from its fold cache; pool, the
    module after the stem (None: none); layers, the nn.Sequentials of fused blocks; optionally a fourth, stem_output:
    the stages begin with the stem's output before the pool (see stage_spec). With `head`, the plan ends as
    fastres.models.ResNet does (its head's pool, flatten, linear: _head_modules); without, it returns the last
    layer's output (the model's _plan_features: timm's forward_features, transformers' last hidden state), or with
    `stages` (a key of its own) the stem's (pool's) output and every layer's, as a tuple (the model's _plan_stages:
    transformers' hidden states, torchvision's IntermediateLayerGetter's outputs); it then runs no _run_plan body
    (which returns the last output only): its Python loop until the key's graph is built."""

    autocast_in_fp32 = True  # (see autocast_computes_in_fp32)

    def __init__(self, model, head):
        """Raises _NotPlannable where the plan does not cover the model as it is now."""
        self._guard_modules(model)
        spec = model._plan_spec()
        if spec is None or not spec[0]:
            raise _NotPlannable
        stem, self.pool, layers, *more = spec
        self.stem_output = bool(more and more[0])
        if self.stem_output and not stem[-1][2]:
            raise _NotPlannable  # (the graph's pool below follows a ReLU, as its NaN check needs)
        # A max pool after the stem's ReLU runs as one pass that applies the ReLU after pooling (they commute),
        # without ATen's argmax indices: (kernel_size, stride, padding, dilation, ceil_mode), or None. Where the
        # stem's output is a stage, the stem's unit applies its ReLU and the pool runs after it: in the graph as
        # F.max_pool2d with these arguments (stem_pool), or None.
        self.pool_relu = _pool_relu_geometry(self.pool) if stem[-1][2] and not self.stem_output else None
        self.stem_pool = _max_pool_arguments(self.pool) if self.stem_output and type(self.pool) is nn.MaxPool2d \
            and not self.pool.return_indices else None
        if self.pool_relu is not None or self.stem_pool is not None:
            self._guard_attributes(self.pool, _MAX_POOL_ATTRIBUTES)
        self.stem = [self._unit(conv, norm, model.fold_cache, name, relu and (k < len(stem) - 1 or
                                                                             self.pool_relu is None))
                     for k, (conv, norm, relu, name) in enumerate(stem)]
        # The first block may write over the max pool's output (or the stem's): nothing else holds it.
        self.pool_output_owned = self.pool is None or type(self.pool) is nn.MaxPool2d
        self.blocks = []  # (unit indices of the residual branch, the projection (see _block) or None, residual)
        self.layer_ends = []  # per layer, the number of blocks run once it has (where `stages` takes its output)
        for layer in layers:
            if type(layer) is not nn.Sequential:
                raise _NotPlannable
            for block in layer:
                self.blocks.append(self._block(block))
            self.layer_ends.append(len(self.blocks))
        self.has_head = head
        # The head's pool and classifier (modules of the model, which the signature covers), or None without a head.
        self.head_pool, self.classifier = _head_modules(model) if head else (None, None)
        # The classifier, whose weight autocast would cast on every call: cast once per plan and autocast dtype.
        self.head = self.classifier if type(self.classifier) is nn.Linear else None
        # The classifier inside the graph body (GRAPH_HEAD), where it is a global average pool then an fp32 linear:
        # the graph then ends with the logits.
        self.head_in_graph = GRAPH_HEAD and self.head is not None and \
            type(self.head_pool) is nn.AdaptiveAvgPool2d and \
            all(t is None or t.dtype == torch.float32 for t in (self.head.weight, self.head.bias)) \
            and _output_size(self.head_pool) == (1, 1)
        if self.head_in_graph:
            self._guard_attributes(self.head_pool, ("output_size",))
        self._guard_tensors([] if self.head is None else [self.head.weight, self.head.bias])
        # input key -> [per unit: (backend, packed weight, bias, autocast dtype) or None; then the graph body (how
        # many one-call bodies ran before it, then the frozen graph, or None where it does not apply); then the body
        # as _run_plan's (weights, biases), or None where it cannot run there; then the head under autocast (a
        # _ClassifierLinear), or _UNRESOLVED]
        self._init_packs()
        self.program = self._program()  # _run_plan's (units, program), or None where the body has more than it runs

    def _guard_modules(self, model):
        """The guard's first half: every module's class, training flag, hooks, children, parameters and buffers (by
        identity), as one signature (fastres._C._module_signature); the root not held: the plan lives in the root's
        fold cache, and a reference back would keep a deleted model alive until the garbage collector runs."""
        modules = list(model.modules())
        if any(m.training or has_own_hooks(m) for m in modules):
            raise _NotPlannable
        self.modules = tuple(modules[1:])
        self.module_signature = _MODULE_SIGNATURE(model, self.modules)
        self.attributes = []  # (module, attribute name, its value (_recorded)), checked by _plan_changed
        self.units = []

    def _guard_attributes(self, module, names):
        self.attributes += [(module, name, _recorded(getattr(module, name))) for name in names]

    def _guard_tensors(self, more):
        """The guard's second half, once the units and attributes are known: the tensors their folds read, and
        `more`."""
        self.attributes = tuple(self.attributes)
        sources = [t for unit in self.units for t in _fold_spec(unit.conv, unit.norm, unit.kind)[0]] + more
        self.tensors = [t for t in sources if t is not None]
        # Whether an autocast forward may run the fp32 body instead (autocast_computes_in_fp32): every tensor the
        # units and the head read is fp32 (the guard sees a change of dtype).
        self.fp32 = all(t.dtype == torch.float32 for t in self.tensors)
        if not _cacheable(self.tensors):
            raise _NotPlannable  # folds that FoldCache would not keep either
        # Their state, as FoldCache checks it (version, pointer, dtype, sizes, strides, sampled bytes), checked in
        # one call before every forward (fastres._C's _plan_changed, in valid). The guard holds the tensors and their
        # storages, so that an unchanged pointer means the same memory, never a new allocation at a freed address.
        self.tensor_state = _TENSOR_STATE(self.tensors)

    def _unit(self, conv, norm, cache, name, relu):
        if not unit_fusable(conv, norm):
            raise _NotPlannable
        kind = norm_kind(norm)
        if kind is None or norm_after_conv(norm, kind):  # (in eval, only a BN whose affine trains)
            raise _NotPlannable
        self._guard_attributes(conv, _CONV_ATTRIBUTES)
        if hasattr(norm, "eps"):
            self._guard_attributes(norm, ("eps",))
        self.units.append(_Unit(conv, norm, kind, cache, name, relu))
        return len(self.units) - 1

    def _block(self, block):
        cls = type(block)
        if not (isinstance(block, _FusedBlock) and cls.forward in PLANNABLE_BLOCK_FORWARDS
                and cls._forward is _FusedBlock._forward and cls._shortcut is _FusedBlock._shortcut
                and is_plain_relu(block.relu)):
            raise _NotPlannable
        self._guard_attributes(block, ("residual",))
        units = block._units()
        branch = [self._unit(conv, norm, block.fold_cache, str(i), True) for i, (conv, norm) in enumerate(units)]
        projection = None  # (a module called before its unit or None, the unit)
        ds = block.downsample
        if block.residual and ds is not None:
            if type(ds) is nn.Sequential and len(ds) == 2:  # conv, norm: _FusedBlock._shortcut's unit
                projection = None, self._unit(ds[0], ds[1], block.fold_cache, "downsample", False)
            elif type(ds) is FusedSequential and len(ds) == 3 and type(ds[0]) in (nn.AvgPool2d, nn.Identity):
                # timm's average-pool shortcut (pool, conv, norm), as FusedSequential.forward runs it
                projection = ds[0], self._unit(ds[1], ds[2], ds.fold_cache, "1", False)
                if type(ds[0]) is nn.AvgPool2d:  # (_run_plan takes its arguments, not the module)
                    self._guard_attributes(ds[0], _AVG_POOL_ATTRIBUTES)
            elif type(ds) is _pad_shortcut():  # the CIFAR nets' option A: parameter-free, no unit
                projection = ds, None
                self._guard_attributes(ds, _PAD_ATTRIBUTES)
            else:
                raise _NotPlannable
        return branch, projection, block.residual

    def _program(self):
        """The body for _run_plan (csrc/cpu_plan.cpp, which documents the encoding): units run from packed weights,
        the fused stem pool (or none), blocks whose shortcut is the identity, a unit, an average pool then a unit,
        or option A; None where it has anything else (another pool after the stem, another module in a shortcut).
        The modules it encodes by their arguments are in the plan's guard (_block, __init__)."""
        if _RUN_PLAN is None:
            return None
        units = []
        for unit in self.units:
            stride, padding, dilation, groups = unit.geometry
            fields = [*stride, *padding, *dilation, groups, int(unit.relu)]
            if len(fields) != 8 or not all(type(v) is int for v in fields):
                return None
            units += fields
        program = [len(self.stem), *self.stem]
        if self.pool_relu is not None:
            kernel_size, stride, padding, dilation, ceil_mode = self.pool_relu
            program += [1, *kernel_size, *stride, *padding, *dilation, int(ceil_mode), 1]
        elif self.pool is None or type(self.pool) is nn.Identity:
            program.append(0)
        else:
            return None
        program += [int(self.pool_output_owned), len(self.blocks)]
        for branch, projection, residual in self.blocks:
            program += [len(branch), *branch]
            if projection is None:
                program.append(1 if residual else 0)
                continue
            shortcut = _shortcut(projection)
            if shortcut is None:
                return None
            kind, *arguments = shortcut
            program += [_RUN_PLAN_SHORTCUT_CODES[kind], *arguments]
        return units, program

    def _runnable(self, packs, stages):
        """After a forward of the Python loop in which every unit ran from its packed weight (run_unit marks the key
        otherwise): _run_plan's (weights, biases), or with `stages` (which _run_plan does not return) _ALL_PACKED:
        the key may have a graph. Else None."""
        if any(p is _UNRESOLVED or p is None for p in packs[:len(self.units)]):
            return None
        if stages:
            return _ALL_PACKED
        if self.program is None:
            return None
        return [p[1] for p in packs[:len(self.units)]], [p[2] for p in packs[:len(self.units)]]

    def valid(self, model, grad_enabled):
        """Whether the model and every tensor the units' folds read are as when the plan was made: the signature,
        attribute and tensor-state checks in one call, the tensors checked by the other intra-op threads while the
        caller's checks the modules (CIFAR ResNet-56 at batch 1 in a tight loop 1.022x faster [95% CI 1.013,
        1.033] than the three checks one after another, ResNet-50 1.006x [0.999, 1.014]; ad hoc, Intel Xeon)."""
        return not _PLAN_CHANGED(model, self.modules, self.module_signature, self.attributes, self.tensor_state,
                                 grad_enabled)

    def _init_packs(self):
        self.packs = collections.OrderedDict()  # input key -> packs, the most recently used last
        self._winograd_weights = {}  # unit index -> (its fold's weight, a weak reference to it transformed)

    def winograd_weight(self, i, weight):
        """Unit i's fold `weight` (a detached view of it) transformed for _winograd_conv3x3: one tensor shared by
        the graphs of the plan's keys (17 MB a convolution in ResNet-50's last stage), held by them only: the plan
        keeps a weak reference, so a transform that no graph uses (a convolution too small at this key's size) is
        freed with the body. The same fold: the same memory (the plan holds the first view, so no other tensor can
        reuse its address; nothing writes a fold in place, and a changed source makes a new plan), sizes, strides
        and dtype."""
        held = self._winograd_weights.get(i)
        transformed = None
        if held is not None and held[0].data_ptr() == weight.data_ptr() and held[0].shape == weight.shape \
                and held[0].stride() == weight.stride() and held[0].dtype == weight.dtype:
            transformed = held[1]()
        if transformed is None:
            transformed = torch.ops.fastres._winograd_weight(weight)
            self._winograd_weights[i] = (weight, weakref.ref(transformed))
        return transformed

    def packs_for(self, key):
        """The key's packs, made on its first call. At most _MAX_DERIVED keys (as many as FoldCache keeps), the least
        recently used dropped first: a shape served often keeps its graph beside a stream of other shapes, where
        dropping the oldest made it rebuild its graph (~1 s for ResNet-50) every fourth new shape."""
        packs = self.packs.get(key)
        if packs is None:
            if len(self.packs) >= _MAX_DERIVED:
                try:
                    self.packs.popitem(last=False)
                except KeyError:  # another thread's call emptied it first
                    pass
            packs = self.packs[key] = [_UNRESOLVED] * (len(self.units) + 3)
        else:
            try:
                self.packs.move_to_end(key)
            except KeyError:  # another thread's call dropped it meanwhile: this call's packs go back in
                self.packs[key] = packs
        return packs

    def run_unit(self, i, x, packs, residual=None, residual_owned=False):
        """Unit i on x: from its packed weight (resolved on the first call for this key), else the per-unit path."""
        unit, packed = self.units[i], packs[i]
        if packed is _UNRESOLVED:
            packed = packs[i] = packed_unit(x, unit.conv, unit.norm, unit.kind, unit.cache, unit.name)
        if packed is not None:
            out = run_packed(packed, x, unit.geometry, residual, unit.relu, residual_owned)
            if out is not None:
                return out
        packs[-2] = None  # a unit not run from its packed weight (not packable, or refused): no _run_plan body
        out = conv_norm_act(x, unit.conv, unit.norm, relu=unit.relu, residual=residual, cache=unit.cache,
                            name=unit.name, residual_owned=residual_owned)
        return keep_memory_format(out, x)

    def run(self, model, x, packs, autocast_dtype, stages=False):
        """What ResNet._forward_impl computes (with a head), or the model's _plan_features (without), or with
        `stages` its _plan_stages: the stem's (pool's) output, then each layer's."""
        # Autocast's cast and the layout in one pass, where the body computes in autocast's dtype: the stem's unit
        # runs from its packed weight (packed in autocast's dtype), or the key's graph (which dropped that weight).
        stem = packs[self.stem[0]]
        if x.dtype == torch.float32 and autocast_dtype is not None and \
                ((stem is not _UNRESOLVED and stem is not None) or type(packs[len(self.units)]) is _Graph):
            x = x.to(dtype=autocast_dtype, memory_format=torch.channels_last)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        body = packs[-2]
        if body is not _UNRESOLVED and body is not None:
            if _graph_dtype(x.dtype, autocast_dtype) == x.dtype:
                out = self._run_graph(x, packs, stages, autocast_dtype is not None)
                if out is not None:
                    graph = packs[len(self.units)]
                    if type(graph) is _Graph and not graph.packs_dropped:  # (another thread may have dropped it)
                        self._drop_unit_packs(packs, graph)
                    return out if self.head_in_graph or stages else self._head(model, out, packs, autocast_dtype)
            if body is _DROPPED:
                # The graph handed this call back (a NaN met a ReLU, or it is gone): the units are packed again
                # through the Python loop, and their packs kept from then on.
                packs[-2] = _UNRESOLVED
            elif body is not _ALL_PACKED:
                try:
                    features = _RUN_PLAN(x, *body, *self.program)
                except RuntimeError:
                    # Refused by this torch's oneDNN: the Python loop from now on. (Nothing was written over the
                    # input, only over tensors the body made.)
                    packs[-2] = None
                else:
                    return self._head(model, features, packs, autocast_dtype)
        for i in self.stem:
            x = self.run_unit(i, x, packs)
        stem_x = x
        if self.pool_relu is not None:
            x = _MAX_POOL_RELU(x, *self.pool_relu, True)
        elif self.pool is not None:
            x = self.pool(x)
        # With stages, the pool's output and each layer's are returned: no block may write over them.
        outputs = [stem_x] * self.stem_output + [x] * (1 + self.layer_ends.count(0)) if stages else None
        owned = self.pool_output_owned and not stages
        for b, (branch, projection, residual) in enumerate(self.blocks):
            block_input = x
            for i in branch[:-1]:
                x = self.run_unit(i, x, packs)
            if projection is not None:
                pre, unit = projection
                if unit is None:  # as _FusedBlock._shortcut calls a module: its output not owned
                    shortcut, shortcut_owned = pre(block_input), False
                else:
                    shortcut = self.run_unit(unit, block_input if pre is None else pre(block_input), packs)
                    shortcut_owned = True
            else:
                shortcut, shortcut_owned = (block_input, owned) if residual else (None, False)
            x = self.run_unit(branch[-1], x, packs, shortcut, shortcut_owned)
            owned = True
            if stages and b + 1 in self.layer_ends:
                outputs += [x] * self.layer_ends.count(b + 1)
                owned = False
        if packs[-2] is _UNRESOLVED:  # (run_unit set None where a unit did not run from its packed weight)
            packs[-2] = self._runnable(packs, stages)
        return tuple(outputs) if stages else self._head(model, x, packs, autocast_dtype)

    def _drop_unit_packs(self, packs, graph):
        """Once a key's graph has run, its units' packed weights (a copy of every conv weight in oneDNN's layout: 90
        MB for ResNet-50) serve only the calls the graph hands back: they are dropped, from the units' fold caches
        too, and made again by the first such call (which then runs the Python loop), kept from then on. The graph
        computes on the folds themselves."""
        graph.packs_dropped = True
        for i, unit in enumerate(self.units):
            pack = packs[i]
            if pack is not _UNRESOLVED and pack is not None:
                unit.cache.discard_derived(unit.name, pack[1])
            packs[i] = _UNRESOLVED
        packs[-2] = _DROPPED

    def _run_graph(self, x, packs, stages=False, in_autocast=False):
        """The body on x (in the graph's dtype, _graph_dtype's) as the key's oneDNN Graph (built on the GRAPH_AFTER +
        1-th call), or None: not (yet) built, not applicable, or a NaN met a ReLU (fused as oneDNN's post-op, which
        maps NaN to 0: the floating-point invalid flag tells, as in _run_plan; the caller then runs _run_plan, which
        keeps NaN). in_autocast: autocast is on; the graph is traced and run with it off (its ops are already in
        autocast's dtype), so that TorchScript inserts no cast of its own."""
        slot = len(self.units)
        graph = packs[slot]
        if graph is _UNRESOLVED or type(graph) is int:
            runs = 0 if graph is _UNRESOLVED else graph
            if runs < GRAPH_AFTER:
                packs[slot] = runs + 1
                return None
            with _autocast_off(in_autocast):
                graph = packs[slot] = self._graph(x, stages)
        if graph is None:
            return None
        clear, raised = _FE_INVALID
        flags = clear()
        try:
            with _onednn_fusion(), _autocast_off(in_autocast):
                out = graph.module(x)
        except RuntimeError:
            packs[slot] = None  # refused by this torch: the one-call body from now on
            raised(flags)  # (restores the flags)
            return None
        if not raised(flags):
            graph.misses = 0
            return out
        # Inputs that keep meeting NaN would pay for two bodies each time: the one-call body alone from then on.
        graph.misses += 1
        if graph.misses >= _GRAPH_MISSES:
            packs[slot] = None
        return None

    def _graph(self, x, stages=False):
        """The body as a frozen TorchScript graph of plain ops on the units' folds (with `stages`, returning the
        pool's and every layer's output), run once for each of the calls the graph executor profiles before it
        fuses; None where the body has a module it does not cover (a pool other than the stem's max pool) or
        TorchScript fails on it."""
        blocks = []
        for branch, projection, residual in self.blocks:
            shortcut = None if projection is None else _shortcut(projection)
            if projection is not None and shortcut is None:
                return None
            blocks.append((branch, shortcut, residual))
        if self.pool_relu is None and self.stem_pool is None and self.pool is not None and \
                type(self.pool) is not nn.Identity:
            return None
        folds = self._folds(x.dtype)
        if folds is None:
            return None
        head = None
        if self.head_in_graph and not stages:
            head = tuple(None if t is None else t.detach().to(x.dtype) for t in (self.head.weight, self.head.bias))
        return _compile_graph(_GraphBody(self, folds, blocks, head, stages), x)

    def _folds(self, dtype):
        """Each unit's folded (weight, bias), detached, in `dtype`: an fp32 fold cast to bf16 for a bf16 graph (as
        autocast casts it; a copy the graph holds), or None where a fold is in another dtype."""
        folds = []
        for unit in self.units:
            fold = folded_conv_params(unit.conv, unit.norm, unit.kind, unit.cache, unit.name)
            if any(t is not None and t.dtype not in (dtype, torch.float32) for t in fold):
                return None
            folds.append(tuple(None if t is None else t.detach().to(dtype) for t in fold))
        return folds

    def _head(self, model, x, packs, autocast_dtype):
        if not self.has_head:
            return x
        x = torch.flatten(self.head_pool(x), 1)
        if self.head is None or autocast_dtype is None:
            return self.classifier(x)
        head = packs[-1]
        if head is _UNRESOLVED:
            head = packs[-1] = _ClassifierLinear(self.head, autocast_dtype, x.shape[0])
        return head(x)  # under autocast, as the classifier would compute it


class _SequentialPlan(_Plan):
    """The eval forward of a network that is a sequence (fastres.models.VGG: features, then avgpool, flatten and the
    classifier): its features as a oneDNN Graph of the same units, its head the model's own modules (avgpool and
    classifier, called as its forward calls them). The model describes its features as `_sequential_plan_spec()`
    -> [(name, module)], or None. The guard is _Plan's. Only the graph is planned, in fp32 or bf16 (a bf16 model, or
    bf16 autocast of an fp32 one, where oneDNN has bf16 kernels): until a key's graph is built (GRAPH_AFTER
    forwards), in another dtype, and where a NaN met a ReLU (the invalid flag, as in _Plan._run_graph), run returns
    None and the model's per-unit forward runs. A feature the graph would not
    compute as the per-unit path does is not planned: a module other than a unit, a plain ReLU, a max pool or an
    identity; a max pool whose input does not come from a ReLU (oneDNN's pooling need not keep a NaN, and a NaN
    reaches a pool after a ReLU only where the ReLU's post-op raised the flag)."""

    autocast_in_fp32 = False  # (under autocast, the per-unit path and the graph compute in autocast's dtype)

    def __init__(self, model, head):
        if not head:
            raise _NotPlannable
        self._guard_modules(model)
        features = model._sequential_plan_spec()
        if features is None:
            raise _NotPlannable
        units = {i: (j, conv, norm, relu) for i, j, conv, norm, relu in sequence_units(features)}
        self.steps = []  # ("unit", unit index) | ("relu", None) | ("pool", _max_pool_arguments)
        after_relu, i = False, 0
        while i < len(features):
            name, module = features[i]
            if i in units:
                i, conv, norm, relu = units[i]
                self.steps.append(("unit", self._unit(conv, norm, model.fold_cache, name, relu)))
                after_relu = relu
                continue
            if is_plain_relu(module):
                self.steps.append(("relu", None))
                after_relu = True
            elif type(module) is nn.MaxPool2d and not module.return_indices and after_relu:
                self._guard_attributes(module, _MAX_POOL_ATTRIBUTES)
                self.steps.append(("pool", _max_pool_arguments(module)))
            elif type(module) is not nn.Identity:
                raise _NotPlannable
            i += 1
        self.has_head = True
        # The classifier as steps, where it is a Sequential of linears, plain ReLUs and dropouts (identities in eval):
        # under autocast its linears run on weights cast once per key (autocast would cast them on every call: VGG-19's
        # three took 141 ms at batch 1 under autocast, 21.6 ms on weights cast once; its first holds 411 MB), in bf16
        # packed once too (_ClassifierLinear), whose sources the guard then watches; else None: the model's classifier
        # runs as it is, its tensors read live.
        self.head_steps = _classifier_steps(model.classifier)
        self._guard_tensors([] if self.head_steps is None else
                            [t for kind, m in self.head_steps if kind == "linear" for t in (m.weight, m.bias)
                             if t is not None])
        # input key -> [_UNRESOLVED per unit (unused); the graph slot, as _Plan's; one unused; the classifier's
        # steps (torch.relu, or a _ClassifierLinear in autocast's dtype), or _UNRESOLVED]
        self._init_packs()

    def run(self, model, x, packs, autocast_dtype, stages=False):
        dtype = _graph_dtype(x.dtype, autocast_dtype)
        # bf16 only where oneDNN has bf16 kernels for this CPU (elsewhere the per-unit path runs ATen's), and under
        # autocast only for fp32 weights and input (autocast's dtype then is the graph's)
        if stages or dtype is None or (dtype == torch.bfloat16 and not _onednn_has_bf16()) or \
                (autocast_dtype is not None and not (self.fp32 and x.dtype == torch.float32)):
            return None
        features = self._run_graph(x.to(dtype=dtype, memory_format=torch.channels_last), packs, False,
                                   autocast_dtype is not None)
        if features is None:
            return None
        x = torch.flatten(model.avgpool(features), 1)
        if autocast_dtype is None or self.head_steps is None:
            return model.classifier(x)
        head = packs[-1]
        if head is _UNRESOLVED:
            head = packs[-1] = [torch.relu if kind == "relu" else
                                _ClassifierLinear(module, autocast_dtype, x.shape[0])
                                for kind, module in self.head_steps]
        for step in head:
            x = step(x)  # as the modules compute it, autocast on
        return x

    def _graph(self, x, stages=False):  # (never with stages: run returns None first)
        folds = self._folds(x.dtype)
        return None if folds is None else _compile_graph(_SequentialGraphBody(self, folds), x)


class _ClassifierLinear:
    """A classifier's nn.Linear under autocast to `dtype`, on its weight and bias cast once (autocast casts them on
    every call), for inputs of `rows` rows (the plan's key fixes them). In bf16, where oneDNN has bf16 kernels, the
    weight is also packed once in oneDNN's blocked layout for that many rows (torch.ops.mkldnn._reorder_linear_weight,
    as Inductor's freezing packs it): ATen's bf16 linear reorders the plain weight on every call. Bit for bit ATen's
    result, measured on VGG-19's and ResNet-50's classifier shapes at 1 to 32 rows (a weight packed for one row count
    can differ in the last bit at another); VGG-19's three linears at batch 1 took 10.9 ms against 15.9 (ad hoc, AMD
    EPYC with AVX512-BF16, 2 threads). Holds no reference to the module: the plan's guard watches its tensors."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, linear, dtype, rows):
        self.weight, self.bias = (None if t is None else _cast_fp32(t, dtype).detach()
                                  for t in (linear.weight, linear.bias))
        self.packed = False
        if _LINEAR_PACKED and torch.backends.mkldnn.enabled and dtype == torch.bfloat16 and \
                self.weight.dtype == torch.bfloat16 and (self.bias is None or self.bias.dtype == torch.bfloat16) \
                and _onednn_has_bf16():
            try:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
                self.packed = True
            except RuntimeError:  # refused by this torch's oneDNN: ATen's linear on the cast weight
                pass

    def __call__(self, x):
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        if x.dtype in (torch.float32, torch.float16):
            x = x.to(torch.bfloat16)  # the input cast autocast would make
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _classifier_steps(classifier):
    """[(kind, module)] for a classifier that is an nn.Sequential of nn.Linear ("linear"), plain ReLUs ("relu"),
    dropouts and identities (nothing in eval: left out), or None."""
    if type(classifier) is not nn.Sequential:
        return None
    steps = []
    for module in classifier:
        if type(module) is nn.Linear:
            steps.append(("linear", module))
        elif is_plain_relu(module):
            steps.append(("relu", module))
        elif type(module) not in (nn.Dropout, nn.Identity):
            return None
    return steps


def _head_modules(model):
    """(pool, classifier): the modules a _Plan's head runs, classifier(torch.flatten(pool(x), 1)): the model's
    _plan_head() where it has one (timm's ResNet after fastres.convert), else its avgpool and fc (fastres.models'
    ResNets)."""
    return model._plan_head() if hasattr(model, "_plan_head") else (model.avgpool, model.fc)


def _compile_graph(body, x):
    """A _Graph of `body` frozen for x (TorchScript's oneDNN Graph fusion), run once for each of the calls the graph
    executor profiles before it fuses; None where TorchScript fails on it."""
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _onednn_fusion():
            warnings.simplefilter("ignore")  # TorchScript's deprecation
            example = x.clone()  # (x is an inference tensor under inference mode)
            graph = torch.jit.freeze(_in_own_compilation_unit(torch.jit.trace(body.eval(), example,
                                                                                check_trace=False), body))
            for _ in range(_GRAPH_WARM_CALLS):
                graph(example)
    except Exception:  # noqa: BLE001 - any TorchScript failure: the caller's other path stays
        return None
    return _Graph(graph)


def _onednn_has_bf16():
    """Whether oneDNN has bf16 kernels for this CPU (as fastres's packed path asks)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _graph_dtype(x_dtype, autocast_dtype):
    """The dtype a _Plan's graph body computes in for an input of x_dtype (after the plan's entry) under autocast to
    autocast_dtype (None: off), or None where the body has no graph: fp32 without autocast; bf16 under autocast to
    bf16 (the plan computes in it: autocast_computes_in_fp32), or without autocast for a bf16 input (a bf16 model).
    TorchScript's oneDNN Graph fusion covers fp32 and bf16; fp16 keeps the one-call body."""
    if not GRAPH_BODY:
        return None
    if autocast_dtype is None:
        return x_dtype if x_dtype in (torch.float32, torch.bfloat16) else None
    return torch.bfloat16 if autocast_dtype == torch.bfloat16 and x_dtype in (torch.float32, torch.bfloat16) \
        else None


def _autocast_off(active):
    """CPU autocast off inside the block where `active` (else no context: the fp32 graph pays nothing for it)."""
    return torch.autocast("cpu", enabled=False) if active else contextlib.nullcontext()


def _in_own_compilation_unit(traced, body):
    """The traced body saved and loaded back, its tensors the body's own again. torch.jit.trace puts a module's type
    and methods into TorchScript's global compilation unit, which keeps them for the life of the process, and the
    frozen graph's methods with them, constants included (pytorch/pytorch#96726): every graph a plan dropped stayed
    in memory (ResNet-50 at 112x112: ~34 MB a graph). torch.jit.load gives each module a compilation unit of its own,
    freed with it (the trace's own methods, which hold no tensors, stay behind). The loaded copies of the tensors are
    then replaced by the body's, so that the frozen graph holds those (the folds, shared with the fold cache), not
    copies. The trace is saved with empty tensors in their place (~1 s less for ResNet-50's ~100 MB of weights).
    Where TorchScript cannot save or load it, the trace itself (its graph then stays in memory, but runs)."""
    tensors = dict(body.named_buffers())
    empty = torch.empty(0)
    try:
        for name in tensors:
            setattr(traced, name, empty)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        for name, tensor in tensors.items():
            setattr(loaded, name, tensor)
        return loaded
    except Exception:  # noqa: BLE001 - any TorchScript failure: the global compilation unit, as before
        for name, tensor in tensors.items():
            setattr(traced, name, tensor)
        return traced


class _Graph:
    """A key's graph body, how many forwards in a row it handed to _run_plan (a NaN met a ReLU), and whether the key's
    packed weights were dropped for it (_Plan._drop_unit_packs)."""

    __slots__ = ("module", "misses", "packs_dropped")

    def __init__(self, module):
        self.module, self.misses, self.packs_dropped = module, 0, False


class _onednn_fusion:
    """TorchScript's oneDNN Graph fusion on inside the block only: the flag is global, and no other TorchScript code
    of the process is to see it. Blocks in several threads at once share one span: the first to enter turns the flag
    on, the last to leave restores what the first found (each restoring what it found itself left the flag on after
    two overlapping calls of a thread-pooled server)."""
    _lock = threading.Lock()
    _inside = 0  # blocks entered and not yet left, in all threads
    _found = False  # the flag as the first of them found it

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._inside == 0:
                cls._found = torch.jit.onednn_fusion_enabled()
                torch.jit.enable_onednn_fusion(True)
            cls._inside += 1

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._inside -= 1
            if cls._inside == 0:
                torch.jit.enable_onednn_fusion(cls._found)


class _UnitsBody(nn.Module):
    """A plan's units on their folds (their tensors, not copies) as plain ops, for TorchScript to trace: unit(i, x)
    is unit i's conv, bias, residual add and ReLU. Subclasses give the forward."""

    def __init__(self, plan, folds):
        super().__init__()
        units = plan.units
        # per unit: whether it may run as _winograd_conv3x3 (on its transformed weight, wino{i}); unit() decides on
        # the traced input's size (the trace is specific to it)
        self.winograd = []
        for i, (weight, bias) in enumerate(folds):
            self.register_buffer(f"weight{i}", weight)
            self.register_buffer(f"bias{i}", bias)
            self.winograd.append(_cpu_backend.WINOGRAD and _cpu_backend.winograd_applies(weight, units[i].geometry))
            if self.winograd[-1]:
                self.register_buffer(f"wino{i}", plan.winograd_weight(i, weight))
        self.geometry = [unit.geometry for unit in units]
        self.relu = [unit.relu for unit in units]

    def unit(self, i, x, residual=None):
        if self.winograd[i] and _cpu_backend.winograd_pays(getattr(self, f"weight{i}"), x.shape):
            return _WINOGRAD_CONV(x, getattr(self, f"wino{i}"), getattr(self, f"bias{i}"), residual, self.relu[i])
        stride, padding, dilation, groups = self.geometry[i]
        y = F.conv2d(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"), stride, padding, dilation, groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu[i] else y


class _GraphBody(_UnitsBody):
    """What _run_plan computes, then with `head` (the classifier's weight and bias) the logits as _Plan._head
    computes them from it, or with `stages` the pool's and every layer's output: traced by _Plan._graph. blocks:
    (branch units, shortcut, residual), the shortcut None (the identity, or none without residual) or _shortcut's."""

    def __init__(self, plan, folds, blocks, head=None, stages=False):
        super().__init__(plan, folds)
        self.stem, self.pool_relu, self.stem_pool, self.blocks = plan.stem, plan.pool_relu, plan.stem_pool, blocks
        self.stages, self.layer_ends, self.stem_output = stages, plan.layer_ends, plan.stem_output
        self.has_head = head is not None
        if self.has_head:
            self.register_buffer("head_weight", head[0].detach())
            self.register_buffer("head_bias", None if head[1] is None else head[1].detach())

    def forward(self, x):
        for i in self.stem:
            x = self.unit(i, x)
        stem_x = x
        if self.pool_relu is not None:
            kernel_size, stride, padding, dilation, ceil_mode = self.pool_relu
            x = torch.relu(F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode))
        elif self.stem_pool is not None:
            kernel_size, stride, padding, dilation, ceil_mode = self.stem_pool
            x = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        outputs = [stem_x] * (self.stem_output and self.stages) + [x] * (1 + self.layer_ends.count(0))
        for b, (branch, shortcut, residual) in enumerate(self.blocks):
            block_input = x
            for i in branch[:-1]:
                x = self.unit(i, x)
            x = self.unit(branch[-1], x, self.shortcut(shortcut, block_input) if residual else None)
            outputs += [x] * self.layer_ends.count(b + 1)
        if self.stages:
            return tuple(outputs)
        if self.has_head:  # the global average pool, flattened, then the linear
            return F.linear(x.mean((2, 3)), self.head_weight, self.head_bias)
        return x

    def shortcut(self, shortcut, x):
        if shortcut is None:
            return x
        kind, *arguments = shortcut
        if kind == "unit":
            return self.unit(arguments[0], x)
        if kind == "avg_pool":
            kh, kw, sh, sw, ph, pw, ceil_mode, count_include_pad, divisor_override, unit = arguments
            x = F.avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), bool(ceil_mode), bool(count_include_pad),
                             divisor_override or None)
            return self.unit(unit, x)
        stride, zero_channels = arguments  # option A, as PadShortcut computes it
        if stride != 1:
            x = x[:, :, ::stride, ::stride]
        return F.pad(x, (0, 0, 0, 0, 0, zero_channels))


class _SequentialGraphBody(_UnitsBody):
    """_SequentialPlan's features: traced by _SequentialPlan._graph."""

    def __init__(self, plan, folds):
        super().__init__(plan, folds)
        self.steps = plan.steps

    def forward(self, x):
        for kind, argument in self.steps:
            if kind == "unit":
                x = self.unit(argument, x)
            elif kind == "relu":
                x = torch.relu(x)
            else:
                x = F.max_pool2d(x, *argument)
        return x


def _window(pool):
    """A pooling module's (kernel_size, stride, padding) as pairs (stride None: the kernel's)."""
    pair = torch.nn.modules.utils._pair
    return pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)


def _pool_relu_geometry(pool):
    """The arguments of fastres._C's _max_pool_relu for `pool`, where it computes relu(pool(x)) exactly; else None."""
    if _MAX_POOL_RELU is None or type(pool) is not nn.MaxPool2d or pool.return_indices:
        return None
    return _max_pool_arguments(pool)


def _max_pool_arguments(pool):
    """An nn.MaxPool2d's arguments of F.max_pool2d after the input: kernel_size, stride, padding, dilation,
    ceil_mode."""
    return (*_window(pool), torch.nn.modules.utils._pair(pool.dilation), bool(pool.ceil_mode))


def _avg_pool_arguments(pool):
    """An nn.AvgPool2d's arguments as _run_plan reads them (divisor_override None as 0)."""
    kernel_size, stride, padding = _window(pool)
    return (*kernel_size, *stride, *padding, int(pool.ceil_mode), int(pool.count_include_pad),
            pool.divisor_override or 0)


def _output_size(pool):
    """An adaptive pool's output size as a pair (None: the input's size in that dimension)."""
    return torch.nn.modules.utils._pair(pool.output_size)


def _pad_arguments(pad):
    """A PadShortcut's as _run_plan reads them: stride, the zero channels appended."""
    return pad.stride, pad.out_channels - pad.in_channels


# _run_plan's code of each kind of _shortcut (csrc/cpu_plan.cpp; 0 and 1: no shortcut, the identity)
_RUN_PLAN_SHORTCUT_CODES = {"unit": 2, "avg_pool": 3, "pad": 4}


def _shortcut(projection):
    """A block's projection (pre, unit) (see _Plan._block) as _run_plan and the graph body compute it, or None where
    they do not: ("unit", unit), ("avg_pool", *_avg_pool_arguments, unit) or ("pad", *_pad_arguments) (option A)."""
    pre, unit = projection
    if pre is None or type(pre) is nn.Identity:
        return "unit", unit
    if type(pre) is nn.AvgPool2d:
        return "avg_pool", *_avg_pool_arguments(pre), unit
    if type(pre) is _pad_shortcut():
        return "pad", *_pad_arguments(pre)
    return None


def _pad_shortcut():
    from fastres.models.cifar import PadShortcut  # (cifar imports this module's importer)
    return PadShortcut


def stage_spec(items, taps):
    """For a module that calls its (name, module) `items` in order and returns the outputs of the names in `taps`
    (torchvision's IntermediateLayerGetter, timm's FeatureDictNet): (its _plan_spec, the names whose outputs the
    plan's stages are, in order), where the items are a stem of units (conv, norm, ReLU: fastres.nn._lean.
    sequence_units of the items, one after another from the first), an optional pool and layers (nn.Sequential), and
    every tap is the pool (or the stem, without one), a layer, or the stem's last ReLU before the pool (the spec's
    stem_output); else None."""
    stem, end = [], 0
    for i, j, conv, norm, relu in sequence_units(items, taps):  # the stem: the units from the first item on
        if i != end:
            break
        stem.append((conv, norm, relu, items[i][0]))
        end = j
    if not stem:
        return None
    stem_name, pool_name, pool = items[end - 1][0], None, None
    if end < len(items) and type(items[end][1]) is not nn.Sequential:
        (pool_name, pool), end = items[end], end + 1
    layers = items[end:]
    if not all(type(layer) is nn.Sequential for _, layer in layers):
        return None
    stem_output = pool is not None and stem_name in taps
    names = [stem_name] * stem_output + [pool_name or stem_name] + [name for name, _ in layers]
    if not set(taps) <= set(names):
        return None
    return (stem, pool, [layer for _, layer in layers], stem_output), tuple(names)


class _NotPlannable(Exception):
    """The model as it is now has something the plan does not cover."""


# Set while a backward recomputes a planned forward through the per-unit path.
_RECOMPUTING = contextvars.ContextVar("fastres_plan_recomputing", default=False)
# In a model's __dict__ once a backward has gone through one of its planned forwards.
_BACKWARD_SEEN = "_fastres_eval_backward_seen"


def _planned_with_recomputing_backward(model, x, head, stages):
    """The plan's output for an eval forward under autograd (parameters or input that want gradients), carrying a
    graph node whose backward recomputes the forward through the per-unit path: nothing but the input and the
    parameters is kept, and an inference-only caller (an eval model called without no_grad) pays nothing for
    autograd. None where no plan applies."""
    with torch.no_grad():
        out = run(model, x, head, stages)
    if out is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [b for b in model.buffers() if b.is_floating_point() and not b.is_inference()]
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    outputs = "stages" if stages else "logits" if head else "features"
    return _PlannedForward.apply(list(out) if stages else [out], model, outputs, autocast, buffers, x, *params)


class _PlannedForward(torch.autograd.Function):
    """Identity in forward on a plan's outputs (passed in a list, so that they are not among the inputs): the
    logits, the features or the stages (a tuple). Backward recomputes the forward with autograd (as
    torch.utils.checkpoint does) and differentiates that. The input and the parameters are saved, so an in-place
    change to any of them before the backward raises as autograd does; so does one to a buffer (a BN statistic)
    or a switch to training mode."""

    @staticmethod
    def forward(ctx, out, model, outputs, autocast, buffers, x, *params):
        ctx.model, ctx.outputs, ctx.autocast, ctx.buffers = model, outputs, autocast, buffers
        ctx.buffer_versions = [b._version for b in buffers]
        ctx.save_for_backward(x, *params)
        return tuple(out) if outputs == "stages" else out[0]

    @staticmethod
    def backward(ctx, *grads):
        x, *params = ctx.saved_tensors
        model = ctx.model
        if any(b._version != v for b, v in zip(ctx.buffers, ctx.buffer_versions)) or \
                any(m.training for m in model.modules()):
            raise RuntimeError("fastres: a buffer of the model (a BN statistic) was modified in place, or the model "
                               "was put in training mode, between an eval forward and its backward; the backward "
                               "would recompute a different forward")
        model.__dict__[_BACKWARD_SEEN] = True
        enabled, dtype = ctx.autocast
        token = _RECOMPUTING.set(True)
        try:
            with torch.enable_grad(), torch.autocast("cpu", dtype=dtype, enabled=enabled):
                method = {"logits": "forward", "features": "_plan_features", "stages": "_plan_stages"}[ctx.outputs]
                out = getattr(model, method)(x)
        finally:
            _RECOMPUTING.reset(token)
        out = tuple(out) if ctx.outputs == "stages" else (out,)
        # (an output that is another's tensor, as an empty layer's, is differentiated once, its gradients summed)
        pairs = {}
        for o, g in zip(out, grads):
            if o.requires_grad:
                pairs[id(o)] = (o, g if id(o) not in pairs else pairs[id(o)][1] + g)
        inputs = (x, *params)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[5:]) if need]
        grads = iter(torch.autograd.grad([o for o, _ in pairs.values()], wanted, [g for _, g in pairs.values()],
                                         allow_unused=True, create_graph=torch.is_grad_enabled()))
        return (None,) * 5 + tuple(next(grads) if need else None for need in ctx.needs_input_grad[5:])


def run(model, x, head=True, stages=False):
    """model(x) for a fastres.models.ResNet or CifarResNet in eval mode through its plan (head=False: the last
    layer's output, what the model's _plan_features computes: timm's forward_features, the last hidden state of
    transformers' ResNetModel, after fastres.convert; stages=True, without a head: the stem's output (after its
    pool) and every layer's, as a tuple, what the model's _plan_stages computes: transformers' hidden states), or
    None where no plan applies (the caller runs the per-unit path)."""
    if stages and head:
        raise ValueError("fastres: the plan's stages are its outputs without a head: pass head=False with stages=True")
    if not (getattr(model, "channels_last", True) and x.device.type == "cpu" and x.dim() == 4) or _traced() \
            or functorch_active():
        return None
    if global_hooks_set():
        return None
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        # oneDNN's ops have no autograd formula: the plan runs without a graph, and a backward, if one comes,
        # recomputes the forward through the per-unit path (_PlannedForward). After the first such backward the model
        # takes the per-unit path with autograd directly, as its user differentiates it.
        if _RECOMPUTING.get() or model.__dict__.get(_BACKWARD_SEEN):
            return None
        return _planned_with_recomputing_backward(model, x, head, stages)
    try:
        backend = ops.select("conv_bias_act", x.device)
    except ops.BackendUnavailableError:
        return None  # the per-unit path reports it
    if not hasattr(backend, "prepacked_conv_bias_act") or _PLAN_CHANGED is None or \
            (stages and not hasattr(model, "_plan_stages")):
        return None
    cache = model.fold_cache
    plan = cache.plan
    if plan is not None and plan.has_head != head:
        # A model called both with its head and without (timm's forward and forward_features): each has a plan of
        # its own, the other one kept beside, so that calls that alternate rebuild neither.
        cache.plan, cache.other_plan = cache.other_plan, plan
        plan = cache.plan
    if plan is None or plan.has_head != head or not plan.valid(model, grad_enabled):
        cache.plan = None
        try:
            plan = (_SequentialPlan if hasattr(model, "_sequential_plan_spec") else _Plan)(model, head)
        except _NotPlannable:
            cache.other_plan = None  # (what makes the model unplannable, hooks or training, holds for the other too)
            return None
        cache.plan = plan
        _malloc.tune()  # once per process: activations kept in the heap between forwards (fastres.models._malloc)
        _threads.pin()  # once per process: no worker woken onto the caller's CPU after idle (fastres.models._threads)
    autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    in_fp32 = autocast_dtype is not None and x.dtype == torch.float32 and plan.fp32 and plan.autocast_in_fp32 and \
        autocast_computes_in_fp32(autocast_dtype)
    # Under autocast computed in fp32: the fp32 key (its packed weights and graph), the output in autocast's dtype.
    key = (x.shape, x.dtype, None if in_fp32 else autocast_dtype, torch.is_inference_mode_enabled(), grad_enabled,
           backend, torch.backends.mkldnn.enabled, stages)
    if not in_fp32:
        return plan.run(model, x, plan.packs_for(key), autocast_dtype, stages)
    with torch.autocast("cpu", enabled=False):
        out = plan.run(model, x, plan.packs_for(key), None, stages)
    if out is None:
        return None
    return tuple(o.to(autocast_dtype) for o in out) if stages else out.to(autocast_dtype)


def _autocast_mode():
    mode = os.environ.get("FASTRES_CPU_AUTOCAST", "auto").strip().lower() or "auto"
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"FASTRES_CPU_AUTOCAST must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")
    return mode


def _probed_ratio(dtype):
    """reduced_conv_time_ratio(dtype), measured once per process, dtype and thread count."""
    key = (dtype, torch.get_num_threads())
    ratio = _AUTOCAST_PROBED.get(key)
    if ratio is None:
        ratio = _AUTOCAST_PROBED[key] = reduced_conv_time_ratio(dtype)
    return ratio


def autocast_computes_in_fp32(dtype):
    """Whether the plan, under autocast to `dtype` with an fp32 input, runs its fp32 body (then casts the output to
    `dtype`): FASTRES_CPU_AUTOCAST=fp32, or auto (the default) where reduced_conv_time_ratio(dtype) exceeds
    AUTOCAST_FP32_ABOVE. fp32 computes at least as accurately, so the tolerance rule holds either way."""
    mode = _autocast_mode()
    return mode == "fp32" if mode != "auto" else _probed_ratio(dtype) > AUTOCAST_FP32_ABOVE


def autocast_compute_reason(dtype):
    """What autocast_computes_in_fp32(dtype) decides and why, as a line for reports (it measures where it has not)."""
    mode = _autocast_mode()
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    where = "fp32, output cast to " + name if autocast_computes_in_fp32(dtype) else name
    if mode != "auto":
        return f"computes in {where}: FASTRES_CPU_AUTOCAST={mode}"
    return (f"computes in {where}: this CPU's {name} 3x3 convolution took {_probed_ratio(dtype):.2f}x its fp32 time "
            f"(fp32 above {AUTOCAST_FP32_ABOVE}x)")


def reduced_conv_time_ratio(dtype, channels=128, size=28, rounds=5):
    """This CPU's time for a 3x3 channels_last convolution (batch 1, `channels` in and out, size x size, ATen's
    kernel at the current thread count) in `dtype` over its time in fp32: medians of `rounds` interleaved calls
    after two warm-up calls each (about 20 ms at 2 threads); inf where this torch has no such convolution in `dtype`."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        x = torch.randn(1, channels, size, size, generator=generator)
        weight = torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels ** 0.5)
        args = {d: (x.to(d).contiguous(memory_format=torch.channels_last),
                    weight.to(d).contiguous(memory_format=torch.channels_last)) for d in (torch.float32, dtype)}
        times = {d: [] for d in args}
        try:
            for d, (xd, wd) in args.items():
                F.conv2d(xd, wd, None, 1, 1)
                F.conv2d(xd, wd, None, 1, 1)
        except (RuntimeError, NotImplementedError):
            return float("inf")  # no CPU convolution in that dtype here: fp32 it is
        for _ in range(rounds):
            for d, (xd, wd) in args.items():
                start = time.perf_counter()
                F.conv2d(xd, wd, None, 1, 1)
                times[d].append(time.perf_counter() - start)
    median = {d: sorted(t)[len(t) // 2] for d, t in times.items()}
    return median[dtype] / median[torch.float32]
