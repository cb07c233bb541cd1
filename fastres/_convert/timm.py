"""timm: the ResNet family of timm.models.resnet (ResNet, BasicBlock, Bottleneck): plain, -C/-D deep stems, average-
pool shortcuts, ResNeXt, SE, wide, anti-aliased, DropBlock and stochastic depth.

The fastres classes subclass timm's (isinstance, zero_init_last, forward_head, reset_classifier, ... keep working) and
are built when timm is first met (this module never imports timm itself). A block whose activations are plain ReLUs
and whose extras (drop_block, aa, se, drop_path) do nothing runs as a fastres block (the memory-lean chain in
training, fused units in eval); otherwise each conv + norm (+ ReLU) runs fused and the extras run between them exactly
where timm calls them; under a torch.func transform timm's own forward runs.

Its feature extractors (timm.models._features' FeatureDictNet and FeatureListNet, what features_only=True builds)
run their modules with each conv + norm + ReLU fused, and in eval on CPU from one plan where their modules are a
ResNet's (fastres._convert._stages).
"""
import collections
import functools
import sys

import torch
from torch import nn

from fastres import ops
from fastres._convert import _is_norm
from fastres._convert._stages import StagesMixin
from fastres._convert._swap import swap_class
from fastres._convert.torchvision import Sequential, _to_channels_last
from fastres.models import _eval_plan
from fastres.nn._fused import FusedModuleMixin, functorch_active, has_hooks, is_plain_relu, keep_memory_format
from fastres.nn._lean import conv_norm_act, run_sequence, sequence_units, unshared
from fastres.nn.blocks import _FusedBlock

LIBRARY = "timm"
_CLASS_NAMES = ("BasicBlock", "Bottleneck", "ResNet")
_FEATURE_CLASS_NAMES = ("FeatureDictNet", "FeatureListNet")


def _inert(m):
    """Whether calling `m` (a block's drop_block / aa / se / drop_path slot) would return its input unchanged."""
    if m is None:
        return True
    if has_hooks(m):
        return False
    if type(m) is nn.Identity:
        return True
    drop = sys.modules.get("timm.layers.drop")
    if drop is not None and type(m) in (drop.DropPath, drop.DropBlock2d):
        return not m.training or not m.drop_prob  # both return x unchanged then
    return False


def _unit(x, conv, norm, between, act, after, cache, name):
    """act(between(norm(conv(x)))) then after(): one conv_norm_act with the ReLU fused when nothing sits between the
    norm and a plain ReLU; otherwise the in-between module and the activation called as timm calls them."""
    if _inert(between) and is_plain_relu(act):
        out = conv_norm_act(x, conv, norm, relu=True, cache=cache, name=name)
    else:
        out = conv_norm_act(x, conv, norm, relu=False, cache=cache, name=name)
        if not _inert(between):
            out = between(unshared(out, between))
        out = act(unshared(out, act))
    return out if _inert(after) else after(out)


class _TimmBlock(_FusedBlock):
    """What the fastres forms of timm's BasicBlock and Bottleneck share. Subclasses give `_stages()`:
    [(conv, norm, between, act, after)] of the residual branch, in order (the last one's act is the one after the
    residual add, its between / after unused)."""

    residual = True  # timm's blocks always add their shortcut

    def _units(self):
        return [(conv, norm) for conv, norm, *_ in self._stages()]

    @property
    def relu(self):
        """The ReLU that the fused block chain applies after every unit and the residual add: the block's last
        activation when every activation is a plain nn.ReLU and drop_block / aa / se / drop_path do nothing (in the
        current mode); otherwise the first module that stops it (which is not a plain ReLU)."""
        for _, _, between, act, after in self._stages():
            if not is_plain_relu(act):
                return act
            for extra in (between, after):
                if not _inert(extra):
                    return extra
        for extra in (self.se, self.drop_path):
            if not _inert(extra):
                return extra
        return self._stages()[-1][3]

    def forward(self, x):
        if functorch_active():
            return self._forward_modules(x)
        if is_plain_relu(self.relu):
            return _FusedBlock.forward(self, x)
        return keep_memory_format(self._forward_units(x), x)

    def _forward_units(self, x):
        """timm's forward with each conv + norm (+ ReLU) as one conv_norm_act, for blocks with SE, active stochastic
        depth or DropBlock, anti-aliasing, or other activations: the modules in between run where timm runs them."""
        stages = self._stages()
        out = x
        for i, (conv, norm, between, act, after) in enumerate(stages[:-1]):
            out = _unit(out, conv, norm, between, act, after, self.fold_cache, str(i))
        conv, norm, _, act, _ = stages[-1]
        out = conv_norm_act(out, conv, norm, relu=False, cache=self.fold_cache, name=str(len(stages) - 1))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        shortcut, _ = self._shortcut(x)
        if is_plain_relu(act):
            return ops.add_relu(out, shortcut)
        return act(out + shortcut)


# With plain ReLUs and inert extras (what the plan checks: block.relu) the forward is _FusedBlock's.
_eval_plan.PLANNABLE_BLOCK_FORWARDS.add(_TimmBlock.forward)


def _downsample_converted(block):
    """A block's average-pool shortcut (timm's downsample_avg: Sequential(pool, conv, norm)) made a fused Sequential,
    so its conv + norm run through fastres wherever the block calls it."""
    ds = block.downsample
    if type(ds) is nn.Sequential and len(ds) == 3 and not has_hooks(ds):
        swap_class(ds, Sequential)
    return block


class _Root(FusedModuleMixin):
    """timm's ResNet with its stem (conv1, a Conv2d or the deep stem's Sequential, then bn1 and act1) run as fused
    conv + norm + ReLU units, channels_last from the input on (see fastres.models.ResNet). In eval on CPU, forward
    runs the features and, where it is an average pool and a linear (_plan_head), the head from one plan, as
    fastres.models.ResNet does (the head inside its oneDNN Graph); forward_features runs a plan of its own."""

    def _stem_modules(self):
        """[(name, module)] of the stem, the deep stem's Sequential opened so that its last conv fuses with bn1."""
        stem = self.conv1
        if type(stem) is nn.Sequential and not has_hooks(stem):
            mods = [(f"conv1.{name}", m) for name, m in stem._modules.items()]
        else:
            mods = [("conv1", stem)]
        return mods + [("bn1", self.bn1), ("act1", self.act1)]

    def _plan_spec(self):
        """What the eval plan runs of forward_features (fastres.models._eval_plan): the stem as units, the max pool,
        the four layers; None where some stem module is not part of a fused unit (the plan runs units only)."""
        mods = self._stem_modules()
        units, end = sequence_units(mods), 0
        for i, j, *_ in units:
            if i != end:
                return None
            end = j
        if end != len(mods):
            return None
        stem = [(conv, norm, relu, mods[i][0]) for i, _, conv, norm, relu in units]
        return stem, self.maxpool, [self.layer1, self.layer2, self.layer3, self.layer4]

    def _fused_units(self):
        mods = self._stem_modules()
        units = []
        for _, j, conv, norm, relu in sequence_units(mods):
            if norm is None and not relu and j < len(mods) and _is_norm(mods[j][1]):
                norm = mods[j][1]  # a norm the kernels do not run (GroupNorm, ...): reported as an unfused pair
            units.append((conv, norm))
        return units

    def _plan_features(self, x):
        """What the eval plan computes without a head (a backward through a planned forward recomputes it so)."""
        return self.forward_features(x)

    def _plan_head(self):
        """(pool, classifier): forward_head as the eval plan runs it, classifier(torch.flatten(pool(x), 1)), where
        timm's global pool is its SelectAdaptivePool2d of an average pool then a flatten (pool_type "avg"; dropout
        does nothing in eval); else None, and forward runs forward_head after the plan's features."""
        pooling = self.global_pool
        pool, flatten = getattr(pooling, "pool", None), getattr(pooling, "flatten", None)
        if type(pooling).__name__ != "SelectAdaptivePool2d" or not type(pooling).__module__.startswith("timm.") or \
                type(pool) is not nn.AdaptiveAvgPool2d or type(flatten) is not nn.Flatten or \
                (flatten.start_dim, flatten.end_dim) != (1, -1):
            return None
        return pool, self.fc

    def forward(self, x):
        if not self.training and not functorch_active() and self._plan_head() is not None:
            out = _eval_plan.run(self, x)  # CPU eval: the features and the head from one plan (the head in its graph)
            if out is not None:
                return out
        return self._library.forward(self, x)  # forward_features, then forward_head

    def forward_features(self, x):
        if functorch_active():
            return self._library.forward_features(self, x)
        if not self.training:
            out = _eval_plan.run(self, x, head=False)  # CPU eval: the units decided once, not on every call
            if out is not None:
                return out
        x = _to_channels_last(x)
        x = keep_memory_format(run_sequence(self._stem_modules(), x, self.fold_cache), x)
        x = self.maxpool(x)
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return sys.modules[self._library.__module__].checkpoint_seq(layers, x, flatten=True)
        for layer in layers:
            x = layer(x)
        return x


class _Features(StagesMixin):
    """timm's FeatureDictNet (and FeatureListNet, which returns its values as a list): its modules called in order,
    the outputs of return_layers collected (_collect), from the plan where it applies, else with each conv + norm +
    ReLU fused, channels_last; with gradient checkpointing on, timm's own _collect."""

    def _collect(self, x):
        if self.grad_checkpointing or functorch_active():
            return self._library._collect(self, x)
        out = self._planned_outputs(x)
        if out is not None:
            return out
        out = collections.OrderedDict()

        def keep(name, value):  # (a module that returns a tuple or list: as timm selects from it)
            if isinstance(value, (tuple, list)):
                value = torch.cat(value, 1) if self.concat else value[0]
            out[self.return_layers[name]] = value

        run_sequence(self._stage_items(), _to_channels_last(x), self.fold_cache, observed=self.return_layers,
                     on_output=keep)
        return out


@functools.lru_cache(maxsize=None)
def _feature_classes():
    """{name: fastres class} for timm.models._features' FeatureDictNet and FeatureListNet (importing timm)."""
    from timm.models import _features

    return {name: type(name, (_Features, getattr(_features, name)), {
        "__module__": __name__, "__qualname__": name, "_library": getattr(_features, name),
        "__doc__": f"timm.models._features.{name} through fastres (see fastres._convert.timm)."})
        for name in _FEATURE_CLASS_NAMES}


@functools.lru_cache(maxsize=None)
def _classes():
    """{name: fastres class} for timm.models.resnet's BasicBlock, Bottleneck and ResNet (importing timm)."""
    from timm.models import resnet

    def build(name, bases, body):
        cls = type(name, bases, dict(body, __module__=__name__, __qualname__=name, _library=getattr(resnet, name),
                                     _forward_modules=getattr(resnet, name).forward))
        cls.__doc__ = f"timm.models.resnet.{name} through fastres (see fastres._convert.timm)."
        return cls

    def basic_stages(self):
        return [(self.conv1, self.bn1, self.drop_block, self.act1, self.aa), (self.conv2, self.bn2, None, self.act2,
                                                                              None)]

    def bottleneck_stages(self):
        return [(self.conv1, self.bn1, None, self.act1, None), (self.conv2, self.bn2, self.drop_block, self.act2,
                                                                self.aa), (self.conv3, self.bn3, None, self.act3, None)]

    return {"BasicBlock": build("BasicBlock", (_TimmBlock, resnet.BasicBlock), {"_stages": basic_stages}),
            "Bottleneck": build("Bottleneck", (_TimmBlock, resnet.Bottleneck), {"_stages": bottleneck_stages}),
            "ResNet": build("ResNet", (_Root, resnet.ResNet), {})}


def __getattr__(name):
    # The classes exist once timm does: this lets pickle find them by name.
    if name in _CLASS_NAMES:
        return _classes()[name]
    if name in _FEATURE_CLASS_NAMES:
        return _feature_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def converters():
    resnet = sys.modules.get("timm.models.resnet")
    if resnet is None:
        return {}
    classes = _classes()
    found = {resnet.BasicBlock: lambda m: _downsample_converted(swap_class(m, classes["BasicBlock"])),
             resnet.Bottleneck: lambda m: _downsample_converted(swap_class(m, classes["Bottleneck"])),
             resnet.ResNet: lambda m: swap_class(m, classes["ResNet"])}
    features = sys.modules.get("timm.models._features")
    if features is not None:
        for name, cls in _feature_classes().items():
            found[getattr(features, name)] = functools.partial(swap_class, cls=cls)
    return found
