"""Dense tasks on PCE (and any timm) backbones: detection (torchvision), segmentation (smp), their metrics
(torchmetrics), training through :mod:`pce_timm.train`'s loop, and routing pictures on dense-task images."""
from .detection import DETECTION_ARCHS, TimmBackboneWithFPN, create_detector
from .metrics import DetectionMetric, SegmentationMetric
from .segmentation import SEGMENTATION_ARCHS, create_segmenter

__all__ = ['create_detector', 'create_segmenter', 'TimmBackboneWithFPN', 'DetectionMetric', 'SegmentationMetric',
           'DETECTION_ARCHS', 'SEGMENTATION_ARCHS']
