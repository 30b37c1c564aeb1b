"""iwm: the Image World Model layer and training system on top of iwm_kernels."""
__version__ = "0.1.0"
