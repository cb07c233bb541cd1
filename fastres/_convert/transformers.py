"""Hugging Face transformers: the ResNet of transformers.models.resnet.modeling_resnet (ResNetModel,
ResNetForImageClassification, ResNetBackbone): its conv layers, shortcuts, basic and bottleneck layers and the
embeddings (the stem, where the input turns channels_last).

The fastres classes subclass the library's (built when transformers is first met; this module never imports it).
A layer whose activations are nn.ReLU runs as a fastres block (the memory-lean chain in training, fused units in
eval); with another activation (config.hidden_act) its ResNetConvLayers and ResNetShortCut still run each conv + norm
fused, and the library's forward strings them together.
"""
import functools
import sys

from torch import nn

from fastres._convert._swap import swap_class
from fastres._convert.torchvision import _to_channels_last
from fastres.nn._fused import FusedModuleMixin, functorch_active, has_hooks, is_plain_relu, keep_memory_format
from fastres.nn._lean import conv_norm_act, unshared
from fastres.nn.blocks import _FusedBlock

LIBRARY = "transformers"
_MODULE = "transformers.models.resnet.modeling_resnet"
_CLASS_NAMES = ("ResNetConvLayer", "ResNetShortCut", "ResNetBasicLayer", "ResNetBottleNeckLayer", "ResNetEmbeddings")


def _plain_identity(m):
    return type(m) is nn.Identity and not has_hooks(m)


class _ConvLayer(FusedModuleMixin):
    """ResNetConvLayer (convolution, normalization, activation) as one conv_norm_act, the ReLU fused when the
    activation is a plain nn.ReLU; another activation is called after the fused conv + norm."""

    def _fused_units(self):
        return [(self.convolution, self.normalization)]

    def forward(self, hidden_state):
        act = self.activation
        relu = is_plain_relu(act)
        out = conv_norm_act(hidden_state, self.convolution, self.normalization, relu=relu, cache=self.fold_cache,
                            name="unit")
        return out if relu or _plain_identity(act) else act(unshared(out, act))


class _ShortCut(FusedModuleMixin):
    """ResNetShortCut (convolution, normalization) as one conv_norm_act."""

    def _fused_units(self):
        return [(self.convolution, self.normalization)]

    def forward(self, hidden_state):
        return conv_norm_act(hidden_state, self.convolution, self.normalization, relu=False, cache=self.fold_cache,
                             name="unit")


class _Layer(_FusedBlock):
    """What the fastres forms of ResNetBasicLayer and ResNetBottleNeckLayer share: `layer` (ResNetConvLayers, the last
    without activation), `shortcut` (ResNetShortCut or nn.Identity) and `activation` after the residual add, seen by
    fastres's block chain as its units, `downsample` and `relu`."""

    residual = True

    def _units(self):
        return [(conv_layer.convolution, conv_layer.normalization) for conv_layer in self.layer]

    @property
    def downsample(self):
        """The shortcut as fastres's blocks take it: None for a plain nn.Identity, nn.Sequential(conv, norm) holding
        a ResNetShortCut's own two modules (kept across calls, outside the module tree), else the module itself."""
        shortcut = self.shortcut
        if _plain_identity(shortcut):
            return None
        if type(shortcut) in self._shortcut_types and not has_hooks(shortcut):
            view = self.__dict__.get("_fastres_shortcut_pair")
            if view is None or view[0] is not shortcut.convolution or view[1] is not shortcut.normalization:
                view = self.__dict__["_fastres_shortcut_pair"] = nn.Sequential(shortcut.convolution,
                                                                               shortcut.normalization)
            return view
        return shortcut

    @property
    def relu(self):
        """The ReLU that the fused block chain applies after every unit but the last and after the residual add:
        `activation` when it and every inner activation is a plain nn.ReLU (the last conv layer's a plain
        nn.Identity) and no container in between has hooks; otherwise the first module that stops it."""
        if has_hooks(self.layer):
            return self.layer
        *inner, last = self.layer
        for conv_layer in inner:
            if has_hooks(conv_layer) or not is_plain_relu(conv_layer.activation):
                return conv_layer
        if has_hooks(last) or not _plain_identity(last.activation):
            return last
        return self.activation

    def forward(self, hidden_state):
        if functorch_active():
            return self._forward_modules(hidden_state)
        if is_plain_relu(self.relu):
            return _FusedBlock.forward(self, hidden_state)
        # The library's forward with its residual add out of place: the fused conv layers' outputs are saved for
        # their backward.
        out = self.layer(hidden_state) + self.shortcut(hidden_state)
        return keep_memory_format(self.activation(out), hidden_state)


class _Embeddings(FusedModuleMixin):
    """ResNetEmbeddings, turning the input channels_last (the fused kernels' layout) before its fused stem."""

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            return self._library.forward(self, pixel_values)  # the library's error
        x = _to_channels_last(pixel_values)
        return keep_memory_format(self.pooler(self.embedder(x)), x)


@functools.lru_cache(maxsize=None)
def _classes():
    """{name: fastres class} for modeling_resnet's classes (importing transformers' ResNet)."""
    import importlib

    library = importlib.import_module(_MODULE)
    mixins = {"ResNetConvLayer": _ConvLayer, "ResNetShortCut": _ShortCut, "ResNetBasicLayer": _Layer,
              "ResNetBottleNeckLayer": _Layer, "ResNetEmbeddings": _Embeddings}
    classes = {}
    for name in _CLASS_NAMES:
        base = getattr(library, name)
        classes[name] = type(name, (mixins[name], base), {
            "__module__": __name__, "__qualname__": name, "_library": base, "_forward_modules": base.forward,
            "__doc__": f"transformers' {name} through fastres (see fastres._convert.transformers)."})
    # A shortcut the layers open into its (conv, norm): the library's class (not converted yet) or fastres's.
    _Layer._shortcut_types = (library.ResNetShortCut, classes["ResNetShortCut"])
    return classes


def __getattr__(name):
    # The classes exist once transformers does: this lets pickle find them by name.
    if name in _CLASS_NAMES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def converters():
    library = sys.modules.get(_MODULE)
    if library is None:
        return {}
    return {getattr(library, name): functools.partial(swap_class, cls=cls) for name, cls in _classes().items()}
