"""fastres.models: the paper's networks (ResNet-18..152 v1/v1.5, plain nets, CIFAR ResNets, VGG-19) with
torchvision's structure and state_dict keys, running through fastres.ops."""
from fastres.models.cifar import CifarResNet, PadShortcut, cifar_resnet
from fastres.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from fastres.models.vgg import VGG, vgg19

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "CifarResNet", "PadShortcut",
           "cifar_resnet", "VGG", "vgg19"]
