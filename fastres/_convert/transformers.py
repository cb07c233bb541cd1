"""Hugging Face transformers: the ResNet of transformers.models.resnet.modeling_resnet (ResNetModel,
ResNetForImageClassification, ResNetBackbone): its conv layers, shortcuts, basic and bottleneck layers, the
embeddings (the stem, where the input turns channels_last), and ResNetModel and ResNetBackbone, whose CPU eval
forward runs its stem, pool and stages as one plan (fastres.models._eval_plan), as fastres.models.ResNet's does:
the last hidden state alone, or with hidden states (a backbone's feature maps) every stage's output.

The fastres classes subclass the library's (built when transformers is first met; this module never imports it).
A layer whose activations are nn.ReLU runs as a fastres block (the memory-lean chain in training, fused units in
eval); with another activation (config.hidden_act) its ResNetConvLayers and ResNetShortCut still run each conv + norm
fused, and the library's forward strings them together.
"""
import contextvars
import functools
import sys

import torch
from torch import nn

from fastres._convert._swap import swap_class
from fastres._convert.torchvision import _to_channels_last
from fastres.models import _eval_plan
from fastres.nn._fused import FusedModuleMixin, _traced, functorch_active, has_hooks, is_plain_relu, \
    keep_memory_format
from fastres.nn._lean import conv_norm_act, unshared
from fastres.nn.blocks import _FusedBlock

LIBRARY = "transformers"
_MODULE = "transformers.models.resnet.modeling_resnet"
_CLASS_NAMES = ("ResNetConvLayer", "ResNetShortCut", "ResNetBasicLayer", "ResNetBottleNeckLayer", "ResNetEmbeddings",
                "ResNetEncoder", "ResNetModel", "ResNetBackbone")
# While the library's forward of a ResNetModel or ResNetBackbone runs on the plan's stages (_PlannedRoot._serve): its
# (embeddings, input, encoder, stages), so that the embeddings hand back stages[0] for that input and the encoder
# the stages for that output, and the library's forward builds its outputs (pooler, feature maps, hidden states,
# return_dict) as it always does.
_SERVED = contextvars.ContextVar("fastres_transformers_served", default=None)


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
        served = _SERVED.get()
        if served is not None and served[0] is self and served[1] is pixel_values:
            return served[3][0]
        if pixel_values.shape[1] != self.num_channels:
            return self._library.forward(self, pixel_values)  # the library's error
        x = _to_channels_last(pixel_values)
        return keep_memory_format(self.pooler(self.embedder(x)), x)


# With plain ReLUs the forward is _FusedBlock's (what the plan checks: block.relu).
_eval_plan.PLANNABLE_BLOCK_FORWARDS.add(_Layer.forward)


class _Encoder:
    """ResNetEncoder: the library's forward, but where the plan's stages are served for its input (see _SERVED):
    then the same outputs from them (the last stage's, and all with output_hidden_states)."""

    def forward(self, hidden_state, output_hidden_states=False, return_dict=True):
        served = _SERVED.get()
        if served is None or served[2] is not self or served[3][0] is not hidden_state:
            return self._library.forward(self, hidden_state, output_hidden_states, return_dict)
        stages = served[3]
        hidden_states = stages if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in [stages[-1], hidden_states] if v is not None)
        return sys.modules[_MODULE].BaseModelOutputWithNoAttention(last_hidden_state=stages[-1],
                                                                   hidden_states=hidden_states)


class _PlannedRoot(FusedModuleMixin):
    """What ResNetModel and ResNetBackbone share (both have `embedder` and `encoder`): the plan's spec, its last
    hidden state and its stages, and the library's forward run on the plan's stages."""

    def _fused_units(self):
        return []  # (the units are its children's)

    def _plannable(self, pixel_values, extra):
        """Whether an eval forward of these arguments may run from the plan (_eval_plan.run decides the rest):
        not training, no other arguments, not under a trace or torch.func, an input the embeddings take."""
        return not (self.training or extra or functorch_active() or _traced()) and \
            isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4 and \
            pixel_values.shape[1] == self.embedder.num_channels

    def _plan_spec(self):
        """What the eval plan runs (fastres.models._eval_plan): the embedder's conv layer as the stem's unit, its max
        pool, the stages' layers; None where a module between them is not the library's or fastres's own."""
        library, classes = sys.modules[_MODULE], _classes()
        embeddings, encoder = self.embedder, self.encoder
        if type(embeddings) is not classes["ResNetEmbeddings"] or \
                type(encoder) not in (library.ResNetEncoder, classes["ResNetEncoder"]):
            return None
        stem = embeddings.embedder
        if type(stem) is not classes["ResNetConvLayer"]:
            return None
        relu = is_plain_relu(stem.activation)
        if not (relu or _plain_identity(stem.activation)):
            return None
        stages = list(encoder.stages)
        if not all(type(stage) is library.ResNetStage for stage in stages):
            return None
        return [(stem.convolution, stem.normalization, relu, "embedder.embedder")], embeddings.pooler, \
            [stage.layers for stage in stages]

    def _plan_features(self, pixel_values):
        """The last hidden state: the plan's, or the fused modules' (a backward through a planned forward recomputes
        it so)."""
        out = _eval_plan.run(self, pixel_values, head=False)
        if out is not None:
            return out
        return self.encoder(self.embedder(pixel_values), output_hidden_states=False, return_dict=False)[0]

    def _plan_stages(self, pixel_values):
        """The embeddings' output and every stage's (the encoder's hidden states): the plan's, or the fused
        modules'."""
        out = _eval_plan.run(self, pixel_values, head=False, stages=True)
        if out is not None:
            return out
        return self.encoder(self.embedder(pixel_values), output_hidden_states=True, return_dict=False)[1]

    def _serve(self, pixel_values, **arguments):
        """The library's forward on the plan's stages (see _SERVED), or None where no plan applies."""
        stages = _eval_plan.run(self, pixel_values, head=False, stages=True)
        if stages is None:
            return None
        token = _SERVED.set((self.embedder, pixel_values, self.encoder, stages))
        try:
            return self._library.forward(self, pixel_values, **arguments)
        finally:
            _SERVED.reset(token)


class _Model(_PlannedRoot):
    """ResNetModel: in eval on CPU the embeddings and the encoder's stages run as one plan (fastres.models._eval_plan:
    packed weights, the body as one call, then a oneDNN Graph), and the pooler after it; the output is the
    library's. With hidden states, the plan returns every stage's output and the library's forward builds its
    output from them (_serve). Anything the plan does not cover (training, other arguments, an input the
    embeddings refuse, a module the plan does not know) runs the library's forward on the fused modules."""

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None, **kwargs):
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_hidden_states and self._plannable(pixel_values, kwargs):
            out = self._serve(pixel_values, output_hidden_states=output_hidden_states, return_dict=return_dict)
            if out is not None:
                return out
        elif not output_hidden_states and self._plannable(pixel_values, kwargs):
            last_hidden_state = _eval_plan.run(self, pixel_values, head=False)
            if last_hidden_state is not None:
                pooled_output = self.pooler(last_hidden_state)
                if not (return_dict if return_dict is not None else self.config.return_dict):
                    return last_hidden_state, pooled_output
                return sys.modules[_MODULE].BaseModelOutputWithPoolingAndNoAttention(
                    last_hidden_state=last_hidden_state, pooler_output=pooled_output, hidden_states=None)
        return self._library.forward(self, pixel_values, output_hidden_states=output_hidden_states,
                                     return_dict=return_dict, **kwargs)


class _Backbone(_PlannedRoot):
    """ResNetBackbone: in eval on CPU its stages run as one plan, and the library's forward picks its feature maps
    (and hidden states) from them (_serve); anything else runs the library's forward on the fused modules."""

    def forward(self, pixel_values, *args, **kwargs):
        if not args and set(kwargs) <= {"output_hidden_states", "return_dict"} and self._plannable(pixel_values, ()):
            out = self._serve(pixel_values, **kwargs)
            if out is not None:
                return out
        return self._library.forward(self, pixel_values, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _classes():
    """{name: fastres class} for modeling_resnet's classes (importing transformers' ResNet)."""
    import importlib

    library = importlib.import_module(_MODULE)
    mixins = {"ResNetConvLayer": _ConvLayer, "ResNetShortCut": _ShortCut, "ResNetBasicLayer": _Layer,
              "ResNetBottleNeckLayer": _Layer, "ResNetEmbeddings": _Embeddings, "ResNetEncoder": _Encoder,
              "ResNetModel": _Model, "ResNetBackbone": _Backbone}
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
