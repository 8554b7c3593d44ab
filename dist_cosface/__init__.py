"""dist_cosface: distributed CosFace (LMCL) training with a sharded classifier.

Nothing runs at import time; heavy optional dependencies (DALI, DeepSpeed, webdataset,
onnx) are imported only inside the functions that use them.
"""

__version__ = "0.1.0"
