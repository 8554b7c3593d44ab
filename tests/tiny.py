"""The tiny training setup shared by engine, checkpoint and launch tests."""

from __future__ import annotations

# mobilefacenet at 32 px, 16-d embeddings, 8 synthetic identities, no exporter
TINY_OVERRIDES = [
    "model.name=mobilefacenet",
    "model.input_size=32",
    "model.embedding_size=16",
    "data.image_size=32",
    "data.batch_size=4",
    "data.synthetic_num_classes=8",
    "data.synthetic_samples_per_class=8",
    "classifier.num_classes=8",
    "classifier.scale=16.0",
    "metrics.enabled=false",
    "train.log_every=1",
]
