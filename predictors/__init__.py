"""Who will be needed next: expert predictors as small objects over tensors.

Policy only: no devices, no I/O, no import of ``moe_engine`` or ``placement``. See ``base.py``.
"""

from moe_engine.predictors.base import (
    PredictionContext,
    Predictor,
    TraceLike,
    available_predictors,
    make_predictor,
    predictor_class,
    register_predictor,
)

__all__ = ["PredictionContext", "Predictor", "TraceLike", "available_predictors", "make_predictor", "predictor_class",
           "register_predictor"]
