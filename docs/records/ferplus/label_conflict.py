"""How far apart FER2013's and FER+'s labels pull a model, measured on PublicTest.

    python docs/records/ferplus/label_conflict.py MODEL_A MODEL_B   (from the repository root)

MODEL_A and MODEL_B are .keras or .tflite files (A: trained on FER+, B: on FER2013). Prints:
1. how often the two label sets agree on the images FER+'s official majority rule keeps;
2. for each model, its accuracy on the images where both agree, which label it follows where
   they disagree, and its accuracy on the images FER+ drops;
3. the accuracy on agreeing images that a model would need to meet both of issue 22's targets
   at once (FER+ >= 86 %, FER2013 >= 70 %), whatever it does elsewhere;
4. the trade-off between the two models: the argmax of w*log(p_A) + (1-w)*log(p_B).
Only PublicTest (the selection split) is read; PrivateTest is not touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from serenbox.training import ferplus  # noqa: E402
from serenbox.training.evaluate import predictor_for  # noqa: E402

PUBLIC = 1
TARGET_FERPLUS, TARGET_FER2013 = 0.86, 0.70


def main(specs: list[str]) -> None:
    data = np.load(ROOT.parent / "shared/fer2013/fer2013.npz")
    votes = np.load(ROOT.parent / "shared/fer2013/ferplus.npz")["votes"]
    part = data["split"] == PUBLIC
    x, y = data["x"][part], data["y"][part].astype(int)
    keep, plus = ferplus.majority(votes[part])
    agree, differ, dropped = keep & (plus == y), keep & (plus != y), ~keep
    n, n_keep = len(y), int(keep.sum())
    print(f"PublicTest: {n} images, {n_keep} kept by FER+'s majority rule; the labels agree on "
          f"{agree.sum()} ({agree.sum() / n_keep:.1%}), differ on {differ.sum()}, "
          f"FER+ drops {dropped.sum()}")  # fmt: skip
    probs = []
    e_best = 0.0
    for spec in specs:
        name, predict = predictor_for(spec)
        p = predict(x)
        probs.append(p)
        k = p.argmax(1)
        e = float((k[dropped] == y[dropped]).mean())
        e_best = max(e_best, e)
        print(f"{name}: FER2013 {(k == y).mean():.2%}, FER+ {(k[keep] == plus[keep]).mean():.2%}; "
              f"on agreeing images {(k[agree] == y[agree]).mean():.1%}; where they differ it follows "
              f"FER+ {(k[differ] == plus[differ]).mean():.1%}, FER2013 {(k[differ] == y[differ]).mean():.1%}; "
              f"on images FER+ drops (FER2013 label) {e:.1%}")  # fmt: skip
    # Where the labels differ a prediction can match one of them at most, so with accuracy `a` on
    # agreeing images both targets need: (T+ n_keep - a n_agree) + (T n - a n_agree - e n_drop) <= n_differ.
    na, nd, nx = agree.sum(), differ.sum(), dropped.sum()
    need = (TARGET_FERPLUS * n_keep + TARGET_FER2013 * n - nd - e_best * nx) / (2 * na)
    print(f"both targets at once need at least {need:.1%} on the agreeing images (taking the best "
          f"accuracy seen on the dropped ones, {e_best:.1%}, and a prediction matching one label "
          "wherever they differ)")  # fmt: skip
    if len(probs) == 2:
        print("trade-off, argmax of w*log(p_A) + (1-w)*log(p_B):")
        la, lb = (np.log(p + 1e-6) for p in probs)
        for w in np.linspace(0, 1, 11):
            k = (w * la + (1 - w) * lb).argmax(1)
            print(f"  w={w:.1f}: FER2013 {(k == y).mean():.2%}  FER+ {(k[keep] == plus[keep]).mean():.2%}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
