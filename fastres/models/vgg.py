"""VGG-19 (the paper's comparison baseline) with torchvision's structure and state_dict keys.

features' Conv2d (+ BatchNorm2d) + ReLU triples run as one fastres op each; the classifier is torchvision's. In eval
on CPU, after a few forwards of an input shape, the features run as one oneDNN Graph (fastres.models._eval_plan).
"""
import torch
from torch import nn

from fastres.models import _eval_plan
from fastres.nn._fused import FusedModuleMixin, has_hooks, keep_memory_format
from fastres.nn._lean import run_sequence, sequence_units

# torchvision's configuration "E": numbers are 3x3 conv widths, "M" a 2x2 max pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def make_layers(cfg, batch_norm=False):
    layers = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
    return nn.Sequential(*layers)


class VGG(FusedModuleMixin, nn.Module):
    """torchvision.models.VGG (features, avgpool, classifier) with fused conv (+BN) + ReLU in `features`."""

    def __init__(self, features, num_classes=1000, init_weights=True, dropout=0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)
        self._init_fold_cache()

    def _fused_units(self):
        if type(self.features) is not nn.Sequential:
            return []
        return [(conv, norm) for _, _, conv, norm, _ in
                sequence_units([(str(i), m) for i, m in enumerate(self.features)])]

    def _features(self, x):
        features = self.features
        if type(features) is not nn.Sequential or has_hooks(features):
            return features(x)
        return run_sequence([(str(i), m) for i, m in enumerate(features)], x, self.fold_cache)

    def _sequential_plan_spec(self):
        """What the eval plan runs as one oneDNN Graph (fastres.models._eval_plan._SequentialPlan): the features,
        named as _features runs them (their folds are shared); avgpool, flatten and the classifier stay modules."""
        if type(self.features) is not nn.Sequential:
            return None
        return [(str(i), m) for i, m in enumerate(self.features)]

    def forward(self, x):
        if not self.training:
            out = _eval_plan.run(self, x)  # CPU eval: the features as one oneDNN Graph once it is built
            if out is not None:
                return out
        x = keep_memory_format(self._features(x), x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg19(num_classes=1000, batch_norm=False, *, dropout=0.5, init_weights=True, weights=None, progress=True):
    """VGG-19 (batch_norm=True: VGG-19-BN) as torchvision builds it; `weights` takes torchvision's VGG19_Weights /
    VGG19_BN_Weights (torchvision is imported only then)."""
    if weights is not None:
        import torchvision.models as tvm  # only needed to fetch weights

        weights = (tvm.VGG19_BN_Weights if batch_norm else tvm.VGG19_Weights).verify(weights)
        num_classes = len(weights.meta["categories"])
        init_weights = False
    model = VGG(make_layers(VGG19_CFG, batch_norm=batch_norm), num_classes=num_classes, init_weights=init_weights,
                dropout=dropout)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model
