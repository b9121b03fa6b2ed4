"""Every face detector side by side on one robustness grid: speed, recall per cell, false positives.

    python benchmarks/bench_detectors.py [--per-cell N] [--backends haar,blaze-short] [--plot PNG] [--quick]

Frames are 640×480 scenes built from real photos: scikit-image's astronaut head (and FER2013
faces from ../shared/fer2013, upscaled, when that folder is there) pasted with a known face box
onto scikit-image's other photos, over a grid of face heights (20–300 px) × conditions
(frontal, in-plane roll up to ±45°, low light, blur, JPEG, occluded mouth). Face-free frames
are the other photos and textures with nothing pasted. Every backend sees the same gray
frames, as the pipeline gives them, on one thread (TFLite num_threads=1, cv2.setNumThreads(1)).

A face is found when a box's centre lies within 35 % of the face height of the true centre
and its height is within a factor 2 of the true height (box conventions differ between
detectors, so no IoU). Every box on a face-free frame is a false positive. With FER2013 there,
the emotion classifier is also run on each backend's box for the same faces (does the new box
framing cost accuracy?). Prints the tables; saves a plot of recall against face height.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from serenbox.device.config import DetectorConfig  # noqa: E402
from serenbox.device.faces import FaceDetector, build_detector  # noqa: E402

WIDTH, HEIGHT = 640, 480
SIZES = (20, 30, 40, 60, 90, 140, 200, 300)  # face heights, pixels
CONDITIONS = ("frontal", "roll15", "roll30", "roll45", "dark", "blur", "jpeg", "occluded", "fer")
FER = ROOT.parent / "shared" / "fer2013" / "fer2013.npz"
ASTRONAUT_FACE = (177, 66, 95, 95)  # x, y, w, h in scikit-image's 512×512 astronaut
# Not coins: its coins bear portrait heads, one of them frontal.
BACKGROUNDS = (
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "horse",
    "clock",
    "immunohistochemistry",
    "colorwheel",
)
TEXTURES = ("brick", "grass", "gravel", "moon", "page", "text", "retina", "cell")

# name, config: each backend at the daemon's default and at a min_face low enough for the grid's smallest faces
BACKENDS: tuple[tuple[str, dict], ...] = (
    ("haar", {"kind": "haar"}),
    ("haar min16", {"kind": "haar", "min_face": 16}),
    ("blaze-short", {"kind": "blazeface", "blazeface_model": "short"}),
    ("blaze-short min16", {"kind": "blazeface", "blazeface_model": "short", "min_face": 16}),
    ("blaze-full", {"kind": "blazeface", "blazeface_model": "full"}),
)


@dataclass
class Sample:
    image: np.ndarray  # gray 640×480
    condition: str  # a CONDITIONS entry, or "none" for a face-free frame
    size: int  # true face height, 0 for none
    centre: tuple[float, float] = (0.0, 0.0)


# --- building the frames -------------------------------------------------------------------


@cache
def photo(name: str) -> np.ndarray:
    from skimage import data, util

    image = util.img_as_ubyte(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2BGR)


def background(rng: np.random.Generator, names: tuple[str, ...] = BACKGROUNDS) -> np.ndarray:
    """A 640×480 crop of a real photo, rescaled at random, sometimes mirrored."""
    image = photo(names[rng.integers(len(names))])
    h, w = image.shape[:2]
    scale = max(WIDTH / w, HEIGHT / h) * rng.uniform(1.0, 1.6)
    image = cv2.resize(image, (math.ceil(w * scale), math.ceil(h * scale)), interpolation=cv2.INTER_LINEAR)
    y = rng.integers(image.shape[0] - HEIGHT + 1)
    x = rng.integers(image.shape[1] - WIDTH + 1)
    image = image[y : y + HEIGHT, x : x + WIDTH]
    return image[:, ::-1].copy() if rng.random() < 0.5 else image.copy()


def astronaut_head(size: int, roll: float) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head, face `size` px tall and rolled `roll` degrees, on a square
    1.8 face heights wide, with an oval mask so that no square edge frames it."""
    fx, fy, fw, fh = ASTRONAUT_FACE
    source = photo("astronaut")
    centre = (fx + fw / 2, fy + fh / 2)
    scale = size / fh
    side = round(size * 1.8)
    m = cv2.getRotationMatrix2D(centre, roll, scale)
    m[:, 2] += (side / 2 - centre[0], side / 2 - centre[1])
    patch = cv2.warpAffine(source, m, (side, side), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    return patch, oval_mask(side)


def fer_head(face: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A 48×48 FER2013 face upscaled so that its face (about 80 % of the crop) is `size` tall."""
    side = round(size / 0.8)
    patch = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(patch, cv2.COLOR_GRAY2BGR), oval_mask(side, 0.5)


def oval_mask(side: int, core: float = 0.62) -> np.ndarray:
    """Blend weights: 1 in the middle, falling off to 0 towards the edges of the square."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    r = np.hypot((xx - side / 2) / (side / 2), (yy - side / 2) / (side / 2 * 1.1))
    return np.clip((1.0 - r) / (1.0 - core), 0, 1)[..., None]


def paste(scene: np.ndarray, patch: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    h, w = patch.shape[:2]
    region = scene[y : y + h, x : x + w].astype(np.float32)
    scene[y : y + h, x : x + w] = (patch * mask + region * (1 - mask)).astype(np.uint8)


def degrade(image: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    if condition == "dark":  # a dim room: crushed gamma, a third of the light, sensor noise
        dim = 255.0 * (image / 255.0) ** 1.8 * 0.35
        return np.clip(dim + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    if condition == "blur":
        return cv2.GaussianBlur(image, (0, 0), 2.0)
    if condition == "jpeg":
        _, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 15])
        return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    return image


def face_samples(
    size: int, condition: str, count: int, rng: np.random.Generator, fer: np.ndarray | None
) -> Iterator[Sample]:
    for i in range(count):
        scene = background(rng)
        if condition == "fer":
            assert fer is not None
            patch, mask = fer_head(fer[rng.integers(len(fer))], size)
        else:
            roll = {"roll15": 15.0, "roll30": 30.0, "roll45": 45.0}.get(condition, 0.0) * (1 if i % 2 else -1)
            patch, mask = astronaut_head(size, roll)
        side = patch.shape[0]
        x = int(rng.integers(0, max(1, WIDTH - side)))
        y = int(rng.integers(0, max(1, HEIGHT - side)))
        if side > HEIGHT:  # the 300 px faces: the head spills over the frame; keep the face inside
            x, y = (WIDTH - side) // 2 + int(rng.integers(-40, 41)), (HEIGHT - side) // 2
        if condition == "occluded":  # a hand or a mask over the lower third of the face
            cx, cy = side / 2, side / 2
            top = round(cy + size * 0.12)
            patch = patch.copy()
            patch[top : round(cy + size * 0.6), round(cx - size * 0.55) : round(cx + size * 0.55)] = (60, 70, 90)
        # Crop the part of the patch that falls outside the frame.
        x0, y0 = max(0, -x), max(0, -y)
        x1, y1 = min(side, WIDTH - x), min(side, HEIGHT - y)
        paste(scene, patch[y0:y1, x0:x1], mask[y0:y1, x0:x1], x + x0, y + y0)
        image = degrade(scene, condition, rng)
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        yield Sample(gray, condition, size, (x + side / 2, y + side / 2))


def free_samples(count: int, rng: np.random.Generator) -> Iterator[Sample]:
    """Face-free frames: the photos and textures themselves, some dimmed or compressed."""
    names = BACKGROUNDS + TEXTURES
    for i in range(count):
        image = background(rng, (names[i % len(names)],))
        image = degrade(image, ("none", "dark", "jpeg", "blur")[(i // len(names)) % 4], rng)
        yield Sample(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), "none", 0)


def load_fer(limit: int = 2000) -> tuple[np.ndarray, np.ndarray] | None:
    """FER2013 PublicTest faces and labels, without the blank and near-blank images it has."""
    if not FER.is_file():
        return None
    with np.load(FER) as archive:
        x, y, split = archive["x"], archive["y"], archive["split"]
    x, y = x[split == 1][:limit], y[split == 1][:limit]
    keep = x.std(axis=(1, 2)) > 20
    return x[keep], y[keep]


# --- scoring ---------------------------------------------------------------------------------


def matches(face: tuple[int, int, int, int], sample: Sample) -> bool:
    x, y, w, h = face
    dx, dy = x + w / 2 - sample.centre[0], y + h / 2 - sample.centre[1]
    return math.hypot(dx, dy) <= 0.35 * sample.size and 0.5 <= max(w, h) / sample.size <= 2.0


@dataclass
class Result:
    times: list[float] = field(default_factory=list)
    face_times: list[float] = field(default_factory=list)  # `times` split by the kind of frame
    free_times: list[float] = field(default_factory=list)
    hits: dict[tuple[str, int], list[bool]] = field(default_factory=dict)
    false_positives: int = 0  # on face-free frames
    free_frames: int = 0


def run(detector: FaceDetector, samples: list[Sample], result: Result) -> None:
    for s in samples:
        t0 = time.perf_counter()
        faces = detector.detect(s.image)
        result.times.append(time.perf_counter() - t0)
        if s.condition == "none":
            result.free_times.append(result.times[-1])
            result.free_frames += 1
            result.false_positives += len(faces)
        else:
            result.face_times.append(result.times[-1])
            result.hits.setdefault((s.condition, s.size), []).append(any(matches(f.box, s) for f in faces))


def recall(result: Result, condition: str | None, size: int) -> float:
    cells = [v for (c, z), v in result.hits.items() if z == size and (condition is None or c == condition)]
    flat = [hit for cell in cells for hit in cell]
    return float(np.mean(flat)) if flat else math.nan


def print_tables(results: dict[str, Result], conditions: list[str]) -> None:
    names = list(results)
    print(f"\nspeed, 640x480 gray frame, 1 thread ({len(next(iter(results.values())).times)} frames each)")
    # The p50 over all frames depends on the mix of face and face-free frames (both detectors
    # take longer on faces), so each kind's p50 is shown too.
    print(f"{'backend':<20}{'p50 ms':>9}{'p95 ms':>9}{'FP/free frame':>15}{'p50 faces':>11}{'p50 free':>10}")
    haar_p50 = None
    for name in names:
        r = results[name]
        p50, p95 = np.percentile(np.array(r.times) * 1000, [50, 95])
        p50_faces = float(np.median(r.face_times)) * 1000 if r.face_times else math.nan
        p50_free = float(np.median(r.free_times)) * 1000 if r.free_times else math.nan
        haar_p50 = (p50, p50_faces, p50_free) if name == "haar" else haar_p50
        speedup = ""
        if haar_p50 and name != "haar":
            ratios = (haar_p50[0] / p50, haar_p50[1] / p50_faces, haar_p50[2] / p50_free)
            speedup = "   {:4.1f}x haar ({:.1f}x faces, {:.1f}x free)".format(*ratios)
        fp = r.false_positives / max(1, r.free_frames)
        print(f"{name:<20}{p50:9.2f}{p95:9.2f}{fp:15.3f}{p50_faces:11.2f}{p50_free:10.2f}{speedup}")
    for name in names:
        r = results[name]
        print(f"\nrecall, {name} (rows: condition, columns: face height px)")
        print(f"{'':<10}" + "".join(f"{s:>6}" for s in SIZES))
        for condition in [*conditions, None]:
            row = [recall(r, condition, s) for s in SIZES]
            cells = "".join("   n/a" if math.isnan(v) else f"{v * 100:6.0f}" for v in row)
            print(f"{condition or 'all':<10}{cells}")


def plot(results: dict[str, Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in results.items():
        ax.plot(SIZES, [recall(r, None, s) * 100 for s in SIZES], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(SIZES, [str(s) for s in SIZES])
    ax.set_xlabel("face height, px (640x480 frame)")
    ax.set_ylabel("recall, % (all conditions)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("bench_detectors.py: recall against face size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def classifier_check(fer_x: np.ndarray, fer_y: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """The emotion classifier on each detector's box for the same FER2013 faces: a detector whose
    boxes frame faces differently from what the classifier learnt would cost accuracy here."""
    from serenbox.device.classifier import Classifier, resolve_model_path

    classifier = Classifier(resolve_model_path(None))
    margin = DetectorConfig().margin
    detectors = {name: build_detector(DetectorConfig(**cfg)) for name, cfg in BACKENDS if "min_face" not in cfg}
    right = {name: 0 for name in detectors}
    found_by_all = 0
    for i in rng.permutation(len(fer_x))[:count]:
        size = int(rng.integers(100, 200))
        scene = background(rng)
        patch, _ = fer_head(fer_x[i], size)
        side = patch.shape[0]
        x, y = int(rng.integers(0, WIDTH - side)), int(rng.integers(0, HEIGHT - side))
        scene[y : y + side, x : x + side] = patch
        gray = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)
        sample = Sample(gray, "fer", size, (x + side / 2, y + side / 2))
        boxes = {}
        for name, detector in detectors.items():
            hits = [f for f in detector.detect(gray) if matches(f.box, sample)]
            if hits:
                boxes[name] = tuple(float(v) for v in hits[0].box)
        if len(boxes) < len(detectors):
            continue
        found_by_all += 1
        for name, box in boxes.items():
            right[name] += int(classifier.classify(gray, [box], margin)[0].argmax() == fer_y[i])
    print(f"\nemotion classifier accuracy on each backend's box as it is, {found_by_all} FER2013 faces all found")
    for name, n in right.items():
        print(f"{name:<20}{n / max(1, found_by_all) * 100:6.1f} %")


def alignment_check(fer_x: np.ndarray, fer_y: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """What turning faces upright by BlazeFace's eye line (detector.align) does to the classifier:
    FER2013 faces, upright and rolled 20° either way, classified as the pipeline does (detect,
    then the crop turned by each face's roll when align is on, as it is when off)."""
    from serenbox.device.classifier import Classifier, resolve_model_path
    from serenbox.device.faces.base import face_rolls

    classifier = Classifier(resolve_model_path(None))
    margin = DetectorConfig().margin
    detector = build_detector(DetectorConfig(kind="blazeface"))
    right = {(view, align): 0 for view in ("upright", "rolled 20°") for align in (False, True)}
    rolls: list[float] = []
    found = 0
    for n, i in enumerate(rng.permutation(len(fer_x))[:count]):
        size, roll = int(rng.integers(110, 180)), 20.0 * (1 if n % 2 else -1)
        side = round(size / 0.8)
        face = cv2.resize(fer_x[i], (side, side), interpolation=cv2.INTER_CUBIC)
        x, y = int(rng.integers(60, WIDTH - side - 60)), int(rng.integers(40, HEIGHT - side - 40))
        frames = []
        for angle in (0.0, roll):
            scene = cv2.cvtColor(background(rng), cv2.COLOR_BGR2GRAY)
            m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
            m[:, 2] += (x, y)
            turned = cv2.warpAffine(face, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
            inside = cv2.warpAffine(np.full_like(face, 255), m, (WIDTH, HEIGHT), flags=cv2.INTER_NEAREST) > 0
            scene[inside] = turned[inside]
            frames.append(scene)
        sample = Sample(frames[0], "fer", size, (x + side / 2, y + side / 2))
        hits = [[f for f in detector.detect(frame) if matches(f.box, sample)] for frame in frames]
        if not all(hits):
            continue
        found += 1
        rolls.append(abs(hits[1][0].roll or 0.0))
        for view, frame, f in zip(("upright", "rolled 20°"), frames, (h[0] for h in hits), strict=True):
            for align in (False, True):
                probs = classifier.classify(frame, [f.box], margin, face_rolls([f], align))
                right[(view, align)] += int(probs[0].argmax() == fer_y[i])
    print(
        f"\neye-line alignment (detector.align), blaze-short, {found} FER2013 PublicTest faces found upright "
        f"and rolled 20° (measured roll of the rolled ones: median {np.median(rolls) if rolls else math.nan:.1f}°)"
    )
    print(f"{'':<14}{'align off':>10}{'align on':>10}")
    for view in ("upright", "rolled 20°"):
        cells = "".join(f"{right[(view, a)] / max(1, found) * 100:9.1f}%" for a in (False, True))
        print(f"{view:<14}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--per-cell", type=int, default=30, help="face frames per grid cell (at 10 one face moves a cell 10 points)"
    )
    parser.add_argument("--free", type=int, default=192, help="face-free frames")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "faces" / "recall_vs_size.png")
    parser.add_argument("--quick", action="store_true", help="2 frames per cell, 16 face-free frames")
    parser.add_argument("--classify", type=int, default=200, help="FER2013 faces for the classifier check (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    names = [name for name, _ in BACKENDS]
    parser.add_argument("--backends", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    args = parser.parse_args(argv)
    chosen = args.backends.split(",")
    if unknown := [n for n in chosen if n not in names]:
        parser.error(f"--backends: unknown {', '.join(unknown)} (choose from {', '.join(names)})")
    if args.quick:
        args.per_cell, args.free, args.classify = 2, 16, 40
    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)

    started = time.perf_counter()
    fer_xy = load_fer()
    fer = fer_xy[0] if fer_xy else None
    conditions = [c for c in CONDITIONS if c != "fer" or fer is not None]
    if fer is None:
        print(f"note: {FER} not found; the fer row is skipped")
    samples: list[Sample] = []
    for condition in conditions:
        for size in SIZES:
            samples.extend(face_samples(size, condition, args.per_cell, rng, fer))
    samples.extend(free_samples(args.free, rng))
    built = time.perf_counter() - started
    print(f"{len(samples)} frames ({args.per_cell} per cell, {args.free} face-free) built in {built:.1f} s")

    detectors: dict[str, FaceDetector] = {}
    for name, overrides in (b for b in BACKENDS if b[0] in chosen):
        detectors[name] = build_detector(DetectorConfig(**{"num_threads": 1, **overrides}))
        detectors[name].detect(samples[0].image)  # warm up: first-call allocations are not per-frame cost
    results = {name: Result() for name in detectors}
    # Interleaved in chunks so that a busy neighbour on the machine slows every backend alike.
    for start in range(0, len(samples), 16):
        chunk = samples[start : start + 16]
        for name, detector in detectors.items():
            run(detector, chunk, results[name])
    print(f"ran in {time.perf_counter() - started:.1f} s")
    print_tables(results, conditions)
    plot(results, args.plot)
    if fer_xy is not None and args.classify:
        classifier_check(*fer_xy, args.classify, rng)
        alignment_check(*fer_xy, args.classify, rng)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
