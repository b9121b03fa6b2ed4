"""Calibration: do the confidences a SerenBox reports mean what they say?

Event confidences are shown to people, so a face reported at 80 % should be right about 80 % of
the time. The measure is the expected calibration error (ECE) of the top label:

    sort the N faces by their top probability (the confidence) into B = 15 equal-width bins
    (0, 1/15], (1/15, 2/15], ..., (14/15, 1]; in each bin b compare the share of faces whose top
    label is right, acc(b), with their mean confidence, conf(b);
    ECE = Σ_b (n_b / N) · |acc(b) − conf(b)|.

0 is perfectly calibrated; a model that says 90 % and is right 70 % of the time has ECE 0.2.
The reliability plot draws acc(b) against conf(b) per bin (the diagonal is calibrated).

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on held-out
data by negative log-likelihood: T > 1 softens over-confident predictions, T < 1 sharpens
under-confident ones; the top label never changes, so accuracy does not either. For a model
whose output is a softmax, the log-probabilities are the logits up to a constant per face, so
the same works on probabilities (zeros of an int8 softmax are floored at `FLOOR`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BINS = 15
FLOOR = 1.0 / 512  # half the step of an int8 softmax (scale 1/256): stands in for its zeros


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """ECE and the per-bin table (count, mean confidence, accuracy; None for empty bins)."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(probs) == 0:
        raise ValueError("no predictions to calibrate")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    filled = count > 0
    mean_conf = np.divide(conf_sum, count, out=np.zeros(bins), where=filled)
    accuracy = np.divide(acc_sum, count, out=np.zeros(bins), where=filled)
    ece = float((count / count.sum() * np.abs(accuracy - mean_conf)).sum())
    return {
        "ece": ece,
        "bins": bins,
        "n": int(count.sum()),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "table": [
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": int(count[b]),
                "confidence": float(mean_conf[b]) if filled[b] else None,
                "accuracy": float(accuracy[b]) if filled[b] else None,
            }
            for b in range(bins)
        ],
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    return reliability(probs, labels, bins)["ece"]


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the predictions of the same model with its logits divided by T."""
    z = np.log(np.maximum(np.asarray(probs, np.float64), FLOOR)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.log(np.maximum(p, 1e-12)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, lo: float = 0.25, hi: float = 4.0) -> float:
    """The T in [lo, hi] that minimises the negative log-likelihood of `labels` (bounded search)."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda t: nll(with_temperature(probs, t), labels), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
    )
    return float(result.x)


def save_reliability_png(curves: dict[str, dict], path: Path, title: str) -> None:
    """One reliability diagram with a curve per label set (`curves`: name → `reliability` result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.6, 6.4), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    width = 1.0 / next(iter(curves.values()))["bins"] if curves else 1.0 / BINS
    for k, (name, r) in enumerate(curves.items()):
        rows = [row for row in r["table"] if row["count"]]
        top.plot(
            [row["confidence"] for row in rows],
            [row["accuracy"] for row in rows],
            marker="o",
            markersize=3,
            label=f"{name}: ECE {r['ece']:.3f} (n={r['n']})",
        )
        offset = (k - (len(curves) - 1) / 2) * width / max(len(curves), 1)
        bottom.bar(
            [(row["lo"] + row["hi"]) / 2 + offset for row in rows],
            [row["count"] / r["n"] for row in rows],
            width=width / max(len(curves), 1),
            label=name,
        )
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=7, loc="upper left")
    top.set_title(title, fontsize=9)
    bottom.set_xlabel(f"confidence (top probability, {BINS} bins)")
    bottom.set_ylabel("share of faces")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
