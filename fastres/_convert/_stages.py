"""What the feature extractors share that call their modules in order and return the outputs of some of them by name
(torchvision's IntermediateLayerGetter, timm's FeatureDictNet and FeatureListNet): in eval on CPU, where those
modules are a ResNet's stem unit, an optional pool and layers of fused blocks, and every output is the stem's
ReLU, the pool or a layer, they run as one plan that returns every stage's output (fastres.models._eval_plan)."""
from collections import OrderedDict

import torch

from fastres.nn._fused import FusedModuleMixin, _traced, functorch_active, has_hooks
from fastres.nn._lean import run_sequence, sequence_units


def _to_channels_last(x):
    if x.dim() == 4 and not functorch_active():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _eval_plan():
    from fastres.models import _eval_plan  # (it imports fastres._convert)
    return _eval_plan


class StagesMixin(FusedModuleMixin):
    """For an nn.ModuleDict that calls its items in order and returns {return_layers[name]: output} for the names in
    its `return_layers`, in module order."""

    def _stage_items(self):
        """[(name, module)] as called, a first item that is a plain nn.Sequential (timm's deep stem) opened, so that
        its convs, norms and ReLUs fuse (with the norm after it too); not where it is itself a return layer."""
        items = list(self.items())
        if items and type(items[0][1]) is torch.nn.Sequential and not has_hooks(items[0][1]) and \
                items[0][0] not in self.return_layers:
            name, stem = items[0]
            items[:1] = [(f"{name}.{child}", m) for child, m in stem._modules.items()]
        return items

    def _fused_units(self):
        return [(conv, norm) for _, _, conv, norm, _ in sequence_units(self._stage_items(), self.return_layers)]

    def _plan_spec(self):
        """What the eval plan runs (fastres.models._eval_plan.stage_spec of its modules and return layers); keeps the
        names whose outputs the plan's stages are (_fastres_stage_names)."""
        found = _eval_plan().stage_spec(self._stage_items(), self.return_layers)
        if found is None:
            return None
        spec, self.__dict__["_fastres_stage_names"] = found
        return spec

    def _plan_stages(self, x):
        """The outputs of the stages' names: the plan's, or the fused modules' (a backward through a planned forward
        recomputes them so)."""
        out = _eval_plan().run(self, x, head=False, stages=True)
        if out is not None:
            return out
        names, got = self._fastres_stage_names, {}
        run_sequence(self._stage_items(), _to_channels_last(x), self.fold_cache, observed=names,
                     on_output=got.__setitem__)
        return tuple(got[name] for name in names)

    def _planned_outputs(self, x):
        """{return_layers[name]: output} from the plan, or None where it does not apply."""
        if self.training or functorch_active() or _traced() or not isinstance(x, torch.Tensor):
            return None
        stages = _eval_plan().run(self, x, head=False, stages=True)
        if stages is None:
            return None
        return OrderedDict((self.return_layers[name], stage) for name, stage in zip(self._fastres_stage_names, stages)
                           if name in self.return_layers)
