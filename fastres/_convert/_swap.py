"""What every ecosystem's converter does to a module: the same object, under a fastres class."""
from fastres.nn._fused import FoldCache, FusedModuleMixin


def swap_class(module, cls, **attributes):
    """`module` itself, now a `cls` (so every reference to it, its hooks, parameters, buffers and training flag stay
    as they were), with `attributes` set. `cls` must run the module's submodules as its old forward did (or
    better)."""
    module.__dict__.setdefault("_fastres_original_class", type(module))  # for fastres.fold_bn(plain=True)
    module.__class__ = cls
    module.__dict__.update(attributes)
    if isinstance(module, FusedModuleMixin):
        module.__dict__["_fastres_fold_cache"] = FoldCache()
    return module
