"""iwm: the Image World Model layer and training system on top of iwm_kernels.

    from iwm import IWM            # encoder + EMA target + conditioned predictor, and the step's loss
    python -m iwm.train ...        # the training system;  python -m iwm.eval ...  the evaluations
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import iwm.config` (e.g. in loader workers) stays light
    if name == "IWM":
        from .models import IWM

        return IWM
    raise AttributeError(f"module 'iwm' has no attribute {name!r}")
