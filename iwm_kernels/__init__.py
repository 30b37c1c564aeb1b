"""iwm_kernels: fused kernels for JEPA-style training (I-JEPA, IWM).

Ops (each with reference, triton and native backends; see `available_backends()`):
  ema_update_           target <- m * target + (1 - m) * online over every parameter, in one launch per dtype
  photometric           colour jitter, grayscale, blur, solarise and normalisation of an image batch, fused
  photometric_two_view  the same for two views at once, from one read of the images
"""
from ._backend import BACKENDS, Availability, available_backends
from .ema import ema_update_
from .photometric import photometric, photometric_two_view

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Availability", "available_backends", "ema_update_", "photometric", "photometric_two_view",
           "__version__"]
