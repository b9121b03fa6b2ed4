"""Raw int8 model outputs for the faces in one photo, and the probabilities `serenbox classify`
publishes for them, as JSON: the test bed's cross-architecture probe.

Run by systemd/testbed.sh with the installed venv's Python inside the booted root. The published
probabilities are rounded, so two machines could agree on them while their int8 outputs differ;
the raw outputs are what "identical on arm64 and amd64" means.
Usage: python int8_scores.py PHOTO
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import cv2
from serenbox.device.classifier import Classifier, resolve_model_path, to_gray
from serenbox.device.config import from_dict
from serenbox.device.events import rounded_probabilities
from serenbox.device.faces import build_detector
from serenbox.device.interpreter import runtime_version


def main(photo: str) -> None:
    cfg = from_dict({})
    classifier = Classifier(resolve_model_path(None), cfg.model.num_threads)
    gray = to_gray(cv2.imread(photo, cv2.IMREAD_COLOR))
    faces = build_detector(cfg.detector).detect(gray)
    boxes = [(float(f.x), float(f.y), float(f.w), float(f.h)) for f in faces]
    raw = [
        classifier._invoke(classifier._interpreters[1], classifier.prepare(crop)[None]).ravel().tolist()
        for crop in classifier.crops(gray, boxes, cfg.detector.margin)
    ]
    published = [rounded_probabilities(p) for p in classifier.classify(gray, boxes, cfg.detector.margin)]
    versions = {"runtime": runtime_version(), "numpy": version("numpy"), "opencv": version("opencv-python-headless")}
    print(json.dumps({"boxes": boxes, "int8": raw, "published": published, "versions": versions}, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
