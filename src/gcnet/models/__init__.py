"""Backbones and model zoo: ResNet/ResNeXt, CIFAR ResNets, C2D/I3D video nets, registry, weight conversion."""

from gcnet.models import zoo  # noqa: F401  (importing it registers the named models)
from gcnet.models.cifar_resnet import CifarResNet, PadShortcut
from gcnet.models.convert import (
    SOURCES,
    LoadReport,
    convert_state_dict,
    inflate_conv_weight,
    load_for_finetuning,
    load_pretrained,
    load_state_dict_file,
    save_state_dict_file,
    timm_block_options,
)
from gcnet.models.insert import insert_context_blocks
from gcnet.models.registry import ModelEntry, create_model, get_model_entry, list_models, register_model
from gcnet.models.resnet import POSITIONS, BasicBlock, Bottleneck, ResNet, ResNetStage
from gcnet.models.video_resnet import VideoResNet

__all__ = [
    "POSITIONS",
    "SOURCES",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "LoadReport",
    "ModelEntry",
    "PadShortcut",
    "ResNet",
    "ResNetStage",
    "VideoResNet",
    "convert_state_dict",
    "create_model",
    "get_model_entry",
    "inflate_conv_weight",
    "load_for_finetuning",
    "insert_context_blocks",
    "list_models",
    "load_pretrained",
    "load_state_dict_file",
    "register_model",
    "save_state_dict_file",
    "timm_block_options",
]
