"""MediaPipe's BlazeFace face detector on the TFLite interpreter the classifier already uses.

The models (device/models/faces/, see PROVENANCE.md there) take an RGB image in [-1, 1] and
return, per anchor, a box (centre offset and size, in input pixels), six landmarks and a logit.
Anchors, decoding and the weighted suppression follow MediaPipe's face_detection graphs
(SsdAnchorsCalculator, TensorsToDetectionsCalculator, NonMaxSuppressionCalculator).

The model sees faces from about `min_px` to `max_px` input pixels tall, whatever the input size.
The short-range model is fully convolutional, so the frame is shrunk just enough for
`detector.min_face` to come out at `min_px` and run at that size (no letterbox, no wasted
pixels); a second, much smaller pass covers faces too big for the first. The full-range model
has a fixed 192×192 input: the frame is letterboxed into it, and overlapping tiles are added
when `min_face` is smaller than one pass can see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from serenbox.device.config import DetectorConfig
from serenbox.device.faces.base import DetectorError, Face, FaceDetector, largest

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "faces"
# A candidate is looked at again in a window this many times its size: the face then spans about
# 40 % of the model's input, the framing MediaPipe's short-range model was trained on.
VERIFY_CONTEXT = 2.5
# Candidates scoring this much skip the second look: no face-free frame in bench_detectors scored
# above 0.8, while most real faces do, so the second look is spent where it decides something.
CONFIDENT = 0.8
# A face min_face tall is min_px tall on the coarsest pass, where its box comes out a little short
# (bench_detectors scenes: 40 px faces rolled 30° boxed 36-40 px at 320x240, 40-43 px at min_face 16):
# the size floor allows that much, so that a min_face face is not dropped for a few pixels.
MIN_FACE_SLACK = 0.85
MAX_INTERPRETERS = 6  # input sizes kept loaded (a camera needs two, plus the second look's)
STRIDE = 16  # the coarsest feature map's stride: a resized input must be a multiple of it
# Gray level → model input in [-1, 1], looked up rather than computed per pixel.
_TO_INPUT = (np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)).astype(np.float32)


@dataclass(frozen=True)
class ModelSpec:
    file: str
    size: int  # native (square) input side, pixels
    strides: tuple[int, ...]  # one per SSD layer, as in MediaPipe's anchor options
    anchors_per_layer: int  # 2 with interpolated_scale_aspect_ratio 1.0, else 1
    resizable: bool  # the interpreter accepts other input sizes (XNNPACK refuses for full-range)
    # Face heights (input pixels) found reliably, measured on scikit-image's astronaut at many
    # sizes (benchmarks/bench_detectors.py shows the effect on a whole grid).
    min_px: float
    max_px: float
    # Whether candidates get a second, centred look (verify_threshold). The short-range model,
    # run over a whole scene, is fooled by textures (about 0.5 false faces per frame at score 0.5
    # in bench_detectors' face-free frames) and a second look at its own scale removes most; the
    # full-range model is seldom fooled, and scores faces that fill a window poorly.
    verify: bool
    score_threshold: float  # detector.score_threshold when that is null
    # The second look's input side. 112 rather than the native 128: on five seeds of
    # bench_detectors' scenes it left no cell below Haar where 128 left one or two in four of
    # them (blurred 60 px faces), with as few false faces, at 1.07 ms a look against 1.40 ms
    # (docs/records/faces/second_look_2026-12-06.md).
    verify_size: int = 0


MODELS: dict[str, ModelSpec] = {
    "short": ModelSpec(
        "face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2, True, 20.0, 160.0, True, 0.35, 112
    ),
    "full": ModelSpec("face_detection_full_range_sparse.tflite", 192, (4,), 1, False, 16.0, 192.0, False, 0.5),
}


def anchors(spec: ModelSpec, height: int, width: int) -> np.ndarray:
    """Anchor centres (N, 2) in input pixels, in the order the model emits its outputs."""
    centres = []
    i = 0
    while i < len(spec.strides):
        # Consecutive layers with one stride share a feature map: their anchors interleave per cell.
        j = i
        while j < len(spec.strides) and spec.strides[j] == spec.strides[i]:
            j += 1
        stride = spec.strides[i]
        ys, xs = np.mgrid[0 : math.ceil(height / stride), 0 : math.ceil(width / stride)]
        grid = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1)
        centres.append(np.repeat(grid, (j - i) * spec.anchors_per_layer, axis=0))
        i = j
    return np.concatenate(centres).astype(np.float32)


@dataclass
class Detection:
    """One face in frame pixels: box corners, score, and six landmarks (x, y): the subject's
    right eye, left eye, nose tip, mouth centre, right ear tragion, left ear tragion."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: np.ndarray  # (6, 2)


@dataclass(frozen=True)
class Pass:
    """A window of the frame (x, y, w, h), scaled into an input of (height, width)."""

    window: tuple[int, int, int, int]
    input_hw: tuple[int, int]


def find_model(spec: ModelSpec, folder: Path | None = None) -> Path:
    path = (folder or MODEL_DIR) / spec.file
    if not path.is_file():
        raise DetectorError(
            f"detector.kind: blazeface: model file {path} is missing "
            "(it ships in the package's device/models/faces/; reinstall serenbox)"
        )
    return path


def _ceil(value: float, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def _starts(length: int, side: int, overlap: int) -> list[int]:
    if side >= length:
        return [0]
    count = math.ceil((length - overlap) / (side - overlap))
    step = (length - side) / (count - 1)
    return [round(i * step) for i in range(count)]


class BlazeFaceDetector(FaceDetector):
    def __init__(self, cfg: DetectorConfig, model_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.spec = MODELS[cfg.blazeface_model]
        self.path = find_model(self.spec, model_dir)
        self._interpreters: dict[tuple[int, int], tuple[Any, int, int, int, np.ndarray]] = {}
        threshold = self.spec.score_threshold if cfg.score_threshold is None else cfg.score_threshold
        self._logit_threshold = math.log(threshold / (1 - threshold)) if threshold < 1 else math.inf
        self._passes: dict[tuple[int, int], list[Pass]] = {}
        # Load now, so that a broken file is reported at start-up rather than at the first frame;
        # the second look's size, as every frame with an unsure candidate needs it.
        side = self.spec.verify_size if self.spec.verify else self.spec.size
        self._resident = (side, side)
        self._interpreter(self._resident)
        self.last: list[Detection] = []  # the detections behind the latest detect(), landmarks included

    def _interpreter(self, input_hw: tuple[int, int]) -> tuple[Any, int, int, int, np.ndarray]:
        """The interpreter for one input size (input, boxes and logits tensor indices, anchors)."""
        if input_hw in self._interpreters:
            return self._interpreters[input_hw]
        from serenbox.device.interpreter import load_interpreter

        native = (self.spec.size, self.spec.size)
        centres = anchors(self.spec, *input_hw)
        try:
            interpreter = load_interpreter(str(self.path), self.cfg.num_threads)
            index = interpreter.get_input_details()[0]["index"]
            if input_hw != native:
                # Checked at the native size first: another model would fail the resize with a
                # message about shapes rather than about what the file is.
                self._check_outputs(interpreter, len(anchors(self.spec, *native)))
                interpreter.resize_tensor_input(index, [1, *input_hw, 3])
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DetectorError(f"detector.kind: blazeface: {self.path} cannot be loaded ({first})") from None
        outputs = self._check_outputs(interpreter, len(centres))
        entry = (interpreter, index, outputs[16]["index"], outputs[1]["index"], centres)
        if len(self._interpreters) >= MAX_INTERPRETERS:
            # `serenbox classify` over photos of many sizes must not keep an interpreter for each.
            del self._interpreters[next(k for k in self._interpreters if k != self._resident)]
            self._passes.clear()
        self._interpreters[input_hw] = entry
        return entry

    def _check_outputs(self, interpreter: Any, count: int) -> dict[int, dict]:
        """The boxes (N, 16) and logits (N, 1) outputs, told apart by shape (names differ
        between releases), with one row for each of the input size's `count` anchors."""
        outputs = {d["shape"][-1]: d for d in interpreter.get_output_details()}
        if set(outputs) != {16, 1} or any(len(d["shape"]) < 2 or d["shape"][1] != count for d in outputs.values()):
            raise DetectorError(f"detector.kind: blazeface: {self.path} does not have BlazeFace's outputs")
        return outputs

    # --- which parts of a frame go through the model, at which size ---------------------------

    def passes(self, width: int, height: int) -> list[Pass]:
        if (width, height) not in self._passes:
            plan = self._plan_resized(width, height) if self.spec.resizable else self._plan_tiled(width, height)
            self._passes[(width, height)] = plan
        return self._passes[(width, height)]

    def _plan_resized(self, width: int, height: int) -> list[Pass]:
        spec, plan = self.spec, []
        scale = min(1.0, spec.min_px / self.cfg.min_face)
        while True:
            plan.append(Pass((0, 0, width, height), (_ceil(height * scale, STRIDE), _ceil(width * scale, STRIDE))))
            # Done when this pass already sees the tallest face the frame can hold.
            if spec.max_px / scale >= min(width, height):
                return plan
            # The next pass starts a little below where this one stops seeing faces.
            scale *= spec.min_px / (0.8 * spec.max_px)

    def _plan_tiled(self, width: int, height: int) -> list[Pass]:
        spec = self.spec
        native = (spec.size, spec.size)
        plan = [Pass((0, 0, width, height), native)]
        if self.cfg.min_face * spec.size / max(width, height) >= spec.min_px:
            return plan
        # Tiles just small enough for min_face to come out at min_px; they overlap by twice
        # min_face so that a face the whole-frame pass cannot see lies whole inside one tile.
        side = min(max(width, height), math.ceil(self.cfg.min_face * spec.size / spec.min_px))
        overlap = min(side // 2, 2 * self.cfg.min_face)
        for y in _starts(height, side, overlap):
            for x in _starts(width, side, overlap):
                plan.append(Pass((x, y, min(side, width - x), min(side, height - y)), native))
        return plan

    # --- running the model --------------------------------------------------------------------

    def _infer(
        self, gray: np.ndarray, step: Pass, shrunk: np.ndarray | None = None
    ) -> tuple[list[Detection], np.ndarray]:
        """Detections of one pass, in frame pixels, and the window as it was shrunk for the model.

        `shrunk`: the same window already shrunk by an earlier pass; a smaller pass shrinks that
        rather than the whole frame again (a tenth of the pixels to average for the big-face pass).
        """
        interpreter, input_index, boxes_index, logits_index, centres = self._interpreter(step.input_hw)
        x0, y0, w, h = step.window
        in_h, in_w = step.input_hw
        scale = min(in_w / w, in_h / h)
        sw, sh = min(in_w, max(1, round(w * scale))), min(in_h, max(1, round(h * scale)))
        source = shrunk if shrunk is not None and shrunk.shape[1] >= sw else gray[y0 : y0 + h, x0 : x0 + w]
        shrink = source.shape[1] > sw
        small = cv2.resize(source, (sw, sh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        # Letterboxed (MediaPipe pads evenly); 0 is mid-gray once pixels are mapped to [-1, 1].
        px, py = (in_w - sw) // 2, (in_h - sh) // 2
        # Written straight into the interpreter's input buffer: no frame-sized array is allocated,
        # filled and copied per pass. The view must be gone before invoke(), which refuses to run
        # while numpy holds its memory.
        tensor = interpreter.tensor(input_index)()
        if (sw, sh) != (in_w, in_h):
            tensor.fill(0.0)
        # The gray frame on all three channels, through a 256-entry table (shrunk first: a third
        # of the resizing work).
        tensor[0, py : py + sh, px : px + sw] = _TO_INPUT[small][..., None]
        del tensor
        interpreter.invoke()
        logits = interpreter.tensor(logits_index)()[0, :, 0]
        keep = np.flatnonzero(logits > self._logit_threshold)
        if keep.size == 0:
            return [], small
        raw = interpreter.tensor(boxes_index)()[0, keep]  # fancy indexing: a copy, not a view
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[keep], -100, 100)))
        del logits
        offset = np.array([x0 - px / scale, y0 - py / scale], np.float32)
        centre = (raw[:, 0:2] + centres[keep]) / scale + offset
        half = raw[:, 2:4] / (2 * scale)
        marks = (raw[:, 4:16].reshape(-1, 6, 2) + centres[keep][:, None, :]) / scale + offset
        corners = np.concatenate([centre - half, centre + half], axis=1).tolist()
        return [Detection(*corners[i], float(scores[i]), marks[i]) for i in range(len(keep))], small

    def _verified(self, gray: np.ndarray, d: Detection) -> bool:
        """A second look at a candidate, centred and at about the scale the model was trained
        for, where a real face scores high and most textures that fooled the whole-frame pass do not."""
        height, width = gray.shape[:2]
        window = _window_around(d, width, height, VERIFY_CONTEXT)
        again, _ = self._infer(gray, Pass(window, self._resident))
        if not again:
            return False
        box = np.array([d.x0, d.y0, d.x1, d.y1], np.float32)
        overlaps = _iou(box, np.array([[a.x0, a.y0, a.x1, a.y1] for a in again], np.float32))
        return any(a.score >= self.cfg.verify_threshold for a, o in zip(again, overlaps, strict=True) if o > 0.3)

    def detect(self, gray: np.ndarray) -> list[Face]:
        # The model was trained on colour; it is given the gray frame on all three channels, as
        # the pipeline has only gray. Colour frames go through gray too, so that the answer does not
        # depend on the caller (colour gave no fewer false positives in bench_detectors' scenes).
        if gray.ndim == 3:
            gray = cv2.cvtColor(gray, cv2.COLOR_BGR2GRAY)
        height, width = gray.shape[:2]
        found: list[Detection] = []
        whole, shrunk = (0, 0, width, height), None
        for step in self.passes(width, height):
            detections, small = self._infer(gray, step, shrunk if step.window == whole else None)
            found.extend(detections)
            shrunk = small if step.window == whole else shrunk
        merged = weighted_nms(found, self.cfg.nms_iou)
        # One candidate per box (two clusters can round to the same box).
        candidates: dict[tuple[int, int, int, int], tuple[Face, Detection]] = {}
        for d in merged:
            x0, y0 = max(0.0, d.x0), max(0.0, d.y0)
            x1, y1 = min(float(width), d.x1), min(float(height), d.y1)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                marks = tuple((float(x), float(y)) for x, y in d.landmarks)
                face = Face(round(x0), round(y0), round(x1 - x0), round(y1 - y0), marks)
                candidates.setdefault(face.box, (face, d))
        # The contract's filter comes before the second look, so that no look is spent on a
        # candidate too small to be kept, nor on more faces than max_faces.
        verify = self.spec.verify and self.cfg.verify_threshold > 0
        kept: list[Face] = []
        self.last = []
        floor = math.floor(self.cfg.min_face * MIN_FACE_SLACK)
        for face in largest([f for f, _ in candidates.values()], floor, len(candidates)):
            d = candidates[face.box][1]
            if verify and d.score < CONFIDENT and not self._verified(gray, d):
                continue
            kept.append(face)
            self.last.append(d)
            if len(kept) == self.cfg.max_faces:
                break
        return kept


def _window_around(d: Detection, width: int, height: int, factor: float) -> tuple[int, int, int, int]:
    side = factor * max(d.x1 - d.x0, d.y1 - d.y0)
    cx, cy = (d.x0 + d.x1) / 2, (d.y0 + d.y1) / 2
    x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    x1, y1 = min(width, round(cx + side / 2)), min(height, round(cy + side / 2))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (N, 4), both as corners."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


def weighted_nms(found: list[Detection], iou: float) -> list[Detection]:
    """MediaPipe's weighted suppression: each cluster around the best remaining box becomes the
    score-weighted mean of its members, which steadies boxes (and tracks) from frame to frame."""
    if not found:
        return []
    order = sorted(found, key=lambda d: d.score, reverse=True)
    boxes = np.array([[d.x0, d.y0, d.x1, d.y1] for d in order], np.float32)
    scores = np.array([d.score for d in order], np.float32)
    marks = np.stack([d.landmarks for d in order])
    left = np.arange(len(order))
    out: list[Detection] = []
    while left.size:
        overlaps = _iou(boxes[left[0]], boxes[left])
        members = left[overlaps > iou]
        weights = scores[members] / scores[members].sum()
        box = (boxes[members] * weights[:, None]).sum(axis=0)
        mark = (marks[members] * weights[:, None, None]).sum(axis=0)
        out.append(Detection(*map(float, box), float(scores[left[0]]), mark))
        left = left[overlaps <= iou]
    return out
