"""Who will be needed next: expert predictors as small objects over tensors.

Policy only: no devices, no I/O, no import of ``moe_engine`` or ``placement``. See ``base.py``.
"""

from predictors.base import PredictionContext, Predictor, available_predictors, make_predictor, register_predictor

__all__ = ["PredictionContext", "Predictor", "available_predictors", "make_predictor", "register_predictor"]
