"""BlazeFace's verify_threshold on bench_detectors' scenes for one seed: false faces per face-free
frame and the grid cells where it finds fewer faces than Haar.

    python docs/records/faces/verify_sweep.py SEED     (from the repository root)
"""

import sys

import cv2
import numpy as np

sys.path.insert(0, "benchmarks")
import bench_detectors as b
from serenbox.device.config import DetectorConfig
from serenbox.device.faces import build_detector

cv2.setNumThreads(1)
rng = np.random.default_rng(int(sys.argv[1]))
fer = b.load_fer()[0]
samples = []
for c in b.CONDITIONS:
    for s in b.SIZES:
        samples.extend(b.face_samples(s, c, 10, rng, fer))
samples.extend(b.free_samples(192, rng))
haar = b.Result()
b.run(build_detector(DetectorConfig(kind="haar", num_threads=1)), samples, haar)
for vt in (0.7, 0.65):
    r = b.Result()
    b.run(build_detector(DetectorConfig(kind="blazeface", num_threads=1, verify_threshold=vt)), samples, r)
    below = [
        (c, s, round(b.recall(r, c, s) * 100), round(b.recall(haar, c, s) * 100))
        for c in b.CONDITIONS
        for s in b.SIZES
        if b.recall(r, c, s) < b.recall(haar, c, s)
    ]
    print(
        vt,
        "FP/frame",
        round(r.false_positives / r.free_frames, 3),
        "p50 ms",
        round(1000 * float(np.median(r.times)), 2),
        "below haar:",
        below,
        "all 20..300",
        [round(b.recall(r, None, s) * 100) for s in b.SIZES],
    )
