"""The class-sharded margin softmax head (CosFace, ArcFace, combined, CurricularFace, AdaFace,
MagFace, NSL, softmax; sub-centers; Partial FC)."""

from dist_cosface.classifier.config import ClassifierConfig
from dist_cosface.classifier.head import HeadStepReport, ShardedClassifier, class_range
from dist_cosface.classifier.margins import scale_lower_bound
from dist_cosface.classifier.optim import RowAdamW, RowSGD, build_classifier_optimizer

__all__ = [
    "ClassifierConfig",
    "HeadStepReport",
    "RowAdamW",
    "RowSGD",
    "ShardedClassifier",
    "build_classifier_optimizer",
    "class_range",
    "scale_lower_bound",
]
