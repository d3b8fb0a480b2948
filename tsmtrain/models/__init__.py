"""Networks: the temporal shift and the TSN/TSM video networks on torchvision backbones.

This package never imports :mod:`tsmtrain.data` or :mod:`tsmtrain.dist`.
"""

from .heads import FeatureClassifier, MoEHead, create_head, shard_classifier
from .networks import VideoNet, count_macs, count_parameters, create_model
from .shift import TemporalShift, temporal_shift

__all__ = ["VideoNet", "create_model", "count_parameters", "count_macs", "TemporalShift", "temporal_shift", "MoEHead",
           "create_head", "FeatureClassifier", "shard_classifier"]
