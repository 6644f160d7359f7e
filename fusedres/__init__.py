"""fusedres: fused conv + BatchNorm + ReLU + residual-add for ResNets, forward and backward.

    import fusedres
    report = fusedres.convert(model)   # swaps torchvision/timm ResNet blocks in place
    print(report)
    fusedres.precompile(model, x)      # compiles the step's Triton kernels at once (on a GPU)
    forward = fusedres.cuda_graphed(model.eval(), x)   # inference replayed from one CUDA graph
    fusedres.info()                    # versions, GPU, which backends are available and why

Importing never fails because the CUDA extension is missing: the Triton or pure-PyTorch
backend runs instead (``fusedres.info()`` says which and why).
"""

from . import nn, ops, reference
from ._extension import build_extension
from ._info import info
from .convert import ConversionReport, convert, refold, revert
from .graphs import CudaGraphedForward, cuda_graphed
from .precompile import PrecompileReport, precompile

__version__ = "0.1.0"
__all__ = ["ConversionReport", "CudaGraphedForward", "PrecompileReport", "build_extension", "convert",
           "cuda_graphed", "info", "nn", "ops", "precompile", "reference", "refold", "revert"]
