"""iwm_kernels: fused kernels for JEPA-style training (I-JEPA, IWM).

Ops (each with reference, triton and native backends; `available_backends()` says what runs here, and
`not_supported_reasons(op, backend, device, dtype)` why one cannot run an op):
  ema_update_           target <- m * target + (1 - m) * online over every parameter, in one launch per dtype
  gather_tokens         per-sample (ragged) token subsets, fused with + pos, + bias and a no-affine layer norm
  apply_masks           drop-in for I-JEPA's apply_masks (list of [B, K] masks), on the gather kernels
  varlen_attention      softmax attention over packed variable-length sequences, with the predictor's
                        shared-context segments (VarlenSelfAttention, pack_predictor_sequences build on it)
  photometric           colour jitter, grayscale, blur, solarise and normalisation of an image batch, fused
  photometric_two_view  the same for two views at once, from one read of the images
  linear, Linear        x @ W^T + b (+ a residual, added in the product), fp32 CPU products on oneDNN
                        (not a backend choice: F.linear under the reference backend, on CUDA, elsewhere)
"""
from ._availability import Availability
from ._backend import BackendUnavailable, available_backends, use_backend
from ._registry import BACKENDS, not_supported_reasons
from .attention import (PackedPredictorInput, VarlenSelfAttention, pack_predictor_sequences, unpack_targets,
                        varlen_attention)
from .ema import ema_update_
from .gather import apply_masks, gather_tokens
from .gemm import Linear, linear
from .photometric import photometric, photometric_two_view

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Availability", "BackendUnavailable", "available_backends", "not_supported_reasons",
           "use_backend", "ema_update_", "gather_tokens", "apply_masks",
           "varlen_attention", "VarlenSelfAttention", "pack_predictor_sequences", "unpack_targets",
           "PackedPredictorInput", "photometric", "photometric_two_view", "linear", "Linear", "__version__"]
