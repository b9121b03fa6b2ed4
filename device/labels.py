"""The emotion labels, in the one order the whole project uses.

Alphabetical, as in the public FER2013 image-folder layout. The model's seven
outputs, the manifest, the events and the training data all use this order.
"""

LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
