"""How much a map changed when the model was randomised (Adebayo et al. 2018, "Sanity Checks for
Saliency Maps", NeurIPS; https://github.com/adebayoj/sanity_checks_saliency): the Spearman rank
correlation and the SSIM between the trained model's map and the randomised model's map of the same
(image, prompt). Both maps are the method's heatmap at the model's input size, in [0, 1].

- Spearman: scipy.stats.spearmanr of the flattened maps (ties share their mean rank). Undefined when a
  map is constant; camloc defines it as 1 when both maps are the same constant and 0 otherwise (a map
  that became constant shares no ranking with the trained one), and counts those pairs.
- SSIM: skimage.metrics.structural_similarity with data_range 1 and its defaults (7 x 7 uniform
  window), as Adebayo et al. computed it with scikit-image.

A method is flagged when its mean Spearman over the pairs at the last stage (every parameter of the
image tower re-drawn) is at least the threshold: its maps do not depend on what the model learnt.
"""
from __future__ import annotations

import math

import numpy as np

from camloc.defaults import DEFAULT_FLAG_SPEARMAN  # noqa: E402,F401  (re-exported)


def _constant(a: np.ndarray) -> bool:
    return bool(a.size == 0 or a.max() == a.min())


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    """(Spearman's rho of the two maps, whether a map was constant and the value camloc's definition)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if _constant(a) or _constant(b):
        return (1.0 if np.array_equal(a, b) else 0.0), True
    return float(spearmanr(a, b).statistic), False


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                       data_range=1.0))


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else 0.0)


def stage_summary(rho: list[float], structural: list[float], constant: int) -> dict:
    """One (method, stage): the pairs' mean and sample standard deviation of each measure."""
    rho_mean, rho_sd = _mean_sd(rho)
    ssim_mean, ssim_sd = _mean_sd(structural)
    return {"spearman": rho_mean, "spearman_sd": rho_sd, "ssim": ssim_mean, "ssim_sd": ssim_sd, "pairs": len(rho),
            "constant_maps": constant}


def flagged(last_stage: dict, threshold: float) -> bool:
    value = last_stage["spearman"]
    return value is not None and not math.isnan(value) and value >= threshold
