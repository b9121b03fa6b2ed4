"""BlazeFace's first-pass score threshold and second-look input size on bench_detectors' scenes.

    python docs/records/faces/second_look_sweep.py collect SEED      (from the repository root)
    python docs/records/faces/second_look_sweep.py table SEED [SEED ...]

`collect` runs BlazeFace short (one thread) over one seed's scenes (10 frames a cell, 192
face-free) with the first pass at score 0.3, and stores, for every candidate the default would
send to a second look (score under 0.8, at least the size floor), its first score and its
second-look scores at 96, 112 and 128 px inputs (context 2.5), plus whether Haar found each
face, in /tmp/second_look_SEED.pkl. `table` replays the rule "first score ≥ st, then kept if
score ≥ 0.8 or second look ≥ vt" for each setting and prints false faces per face-free frame,
faces found, the cells below Haar per seed and pooled, and the second looks' cost per frame
(ms a look measured on one thread: 96 px 0.74, 112 px 1.07, 128 px 1.40).
"""

import math
import pickle
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, "benchmarks")
import bench_detectors as b
from serenbox.device.config import DetectorConfig
from serenbox.device.faces import blazeface as bf
from serenbox.device.faces import build_detector
from serenbox.device.faces.base import Face, largest

LOOK_MS = {96: 0.74, 112: 1.07, 128: 1.40}


def look(det: bf.BlazeFaceDetector, gray: np.ndarray, d: bf.Detection, side: int) -> float:
    h, w = gray.shape
    again, _ = det._infer(gray, bf.Pass(bf._window_around(d, w, h, 2.5), (side, side)))
    if not again:
        return 0.0
    box = np.array([d.x0, d.y0, d.x1, d.y1], np.float32)
    overlaps = bf._iou(box, np.array([[a.x0, a.y0, a.x1, a.y1] for a in again], np.float32))
    return max([a.score for a, o in zip(again, overlaps, strict=True) if o > 0.3], default=0.0)


def collect(seed: int) -> None:
    cv2.setNumThreads(1)
    rng = np.random.default_rng(seed)
    fer = b.load_fer()[0]
    samples = [s for c in b.CONDITIONS for z in b.SIZES for s in b.face_samples(z, c, 10, rng, fer)]
    samples += list(b.free_samples(192, rng))
    det = build_detector(DetectorConfig(num_threads=1, kind="blazeface", score_threshold=0.3))
    haar = build_detector(DetectorConfig(num_threads=1, kind="haar"))
    rows = []
    for s in samples:
        g = s.image
        height, width = g.shape
        found = [d for step in det.passes(width, height) for d in det._infer(g, step)[0]]
        cands: dict = {}
        for d in bf.weighted_nms(found, det.cfg.nms_iou):
            x0, y0, x1, y1 = max(0.0, d.x0), max(0.0, d.y0), min(float(width), d.x1), min(float(height), d.y1)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                f = Face(round(x0), round(y0), round(x1 - x0), round(y1 - y0), ())
                cands.setdefault(f.box, (f, d))
        floor = math.floor(det.cfg.min_face * bf.MIN_FACE_SLACK)
        kept = []
        for f in largest([f for f, _ in cands.values()], floor, len(cands)):
            d = cands[f.box][1]
            looks = {side: look(det, g, d, side) for side in LOOK_MS} if d.score < bf.CONFIDENT else {}
            kept.append((s.condition != "none" and b.matches(f.box, s), d.score, looks))
        haar_hit = s.condition != "none" and any(b.matches(f.box, s) for f in haar.detect(g))
        rows.append((s.condition, s.size, haar_hit, kept))
    Path(f"/tmp/second_look_{seed}.pkl").write_bytes(pickle.dumps(rows))


def table(seeds: list[int]) -> None:
    data = {seed: pickle.loads(Path(f"/tmp/second_look_{seed}.pkl").read_bytes()) for seed in seeds}
    for side in (128, 112, 96):
        for st in (0.3, 0.35, 0.4):
            for vt in (0.68, 0.7, 0.72):
                hits: dict = {}
                haar: dict = {}
                fp = free = frames = 0
                ms = 0.0
                per_seed = []
                for rows in data.values():
                    seed_hits: dict = {}
                    seed_haar: dict = {}
                    for cond, size, haar_hit, cands in rows:
                        frames += 1
                        kept = []
                        for true, score, looks in cands:
                            if score < st:
                                continue
                            if score < bf.CONFIDENT:
                                ms += LOOK_MS[side]
                                if looks[side] < vt:
                                    continue
                            kept.append(true)
                        if cond == "none":
                            free += 1
                            fp += len(kept)
                            continue
                        for h, hh in ((hits, haar), (seed_hits, seed_haar)):
                            h.setdefault((cond, size), []).append(any(kept))
                            hh.setdefault((cond, size), []).append(haar_hit)
                    per_seed.append(sum(sum(v) < sum(seed_haar[k]) for k, v in seed_hits.items()))
                below = [(c, z, sum(v), sum(haar[(c, z)])) for (c, z), v in hits.items() if sum(v) < sum(haar[(c, z)])]
                found = sum(sum(v) for v in hits.values())
                print(
                    f"look {side} st {st} vt {vt}: looks {ms / frames:.2f} ms/frame, FP {fp / free:.3f}/free frame, "
                    f"found {found}, cells below Haar per seed {per_seed}, pooled {below}"
                )


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(int(sys.argv[2]))
    else:
        table([int(s) for s in sys.argv[2:]])
