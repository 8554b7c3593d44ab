"""Small-scale reproductions of the CosFace paper's claims on real faces (ORL, Extended Yale B).

Library side of ``tools/experiments.py`` and ``tools/plot_features_2d.py``: an in-memory face
cache, a fixed open-set identity split with verification pairs, and a compact single-process
training loop around the project's own ``ShardedClassifier`` head.
"""

from dist_cosface.experiments.faces import FaceSet, identity_split, load_faces, make_pairs
from dist_cosface.experiments.runner import ExperimentConfig, run_experiment, train_model

__all__ = [
    "ExperimentConfig",
    "FaceSet",
    "identity_split",
    "load_faces",
    "make_pairs",
    "run_experiment",
    "train_model",
]
