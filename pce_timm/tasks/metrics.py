"""Dense-task metrics through torchmetrics: detection mAP (pycocotools backend) and segmentation IoU.

Detection (:class:`DetectionMetric`): ``map_50`` is VOC's mAP at IoU 0.5 and ``map`` COCO's mAP@[.5:.95],
fractions in [0, 1] as torchmetrics returns them, plus per-class AP at both (``class_metrics=True``).

VOC ``difficult`` boxes: VOC's protocol neither rewards nor punishes them (a detection on a difficult box is
ignored, a missed difficult box is no miss). COCO's ``iscrowd`` does the same for crowd regions, so difficult
boxes go to torchmetrics as ``iscrowd=1``. The one difference: a detection is matched to a crowd box by the
share of the *detection* it covers (COCO) rather than by IoU (VOC), so a detection inside a large difficult
box is ignored a little more readily than under VOC's own code. Pass ``keep_difficult=False`` to the reader
to drop them instead.

Segmentation (:class:`SegmentationMetric`): torchmetrics' multiclass Jaccard index with ``ignore_index=255``
(VOC's border) and ``average='none'``: per-class IoU; ``miou`` is the mean over the classes that occur in
the targets or the predictions of the split (a class absent from both has no IoU; VOC's devkit averages over
all 21 classes, which on the full VOC split is the same thing since every class occurs).

Both are ``torchmetrics.Metric`` s: under ``torch.distributed`` (accelerate) ``compute`` gathers every
process's state, so each process feeds only its own shard of the split.
"""
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

__all__ = ['DetectionMetric', 'SegmentationMetric', 'IGNORE_INDEX']

IGNORE_INDEX = 255


def _number(value: torch.Tensor) -> Optional[float]:
    """A JSON-able float; torchmetrics' -1 (no such class / no boxes) and NaN become None."""
    value = float(value)
    return None if math.isnan(value) or value < 0 else round(value, 6)


class DetectionMetric:
    """mAP of detections against ground truth boxes (``update`` per batch, ``compute`` once per split).

    Args:
        class_names: index -> name, index 0 the background (never a box label).
    """

    def __init__(self, class_names: Sequence[str]):
        self.class_names = tuple(class_names)
        common = dict(box_format='xyxy', iou_type='bbox', class_metrics=True, backend='pycocotools')
        self.coco = MeanAveragePrecision(**common)  # map, map_50, per-class map@[.5:.95]
        self.voc = MeanAveragePrecision(iou_thresholds=[0.5], **common)  # per-class AP at IoU 0.5

    def to(self, device) -> 'DetectionMetric':
        self.coco.to(device)
        self.voc.to(device)
        return self

    def update(self, predictions: List[Dict[str, torch.Tensor]], targets: List[Dict[str, Any]]) -> None:
        """``predictions``: torchvision detection outputs (boxes xyxy, scores, labels); ``targets``: the reader's
        (boxes, labels, optional difficult)."""
        preds = [{'boxes': p['boxes'].detach().float(), 'scores': p['scores'].detach().float(),
                  'labels': p['labels'].detach().long()} for p in predictions]
        gts = []
        for t in targets:
            boxes = torch.as_tensor(t['boxes']).float().reshape(-1, 4)
            difficult = t.get('difficult')
            crowd = (torch.zeros(len(boxes), dtype=torch.long) if difficult is None
                     else torch.as_tensor(difficult).long())
            gts.append({'boxes': boxes.to(preds[0]['boxes'].device if preds else boxes.device),
                        'labels': torch.as_tensor(t['labels']).long().to(boxes.device),
                        'iscrowd': crowd.to(boxes.device)})
        self.coco.update(preds, gts)
        self.voc.update(preds, gts)

    def compute(self) -> Dict[str, Any]:
        """``map_50``, ``map`` and ``per_class`` (name -> {ap_50, ap}; None for a class with no boxes)."""
        coco, voc = self.coco.compute(), self.voc.compute()
        per_class: Dict[str, Dict[str, Optional[float]]] = {}
        ap50 = dict(zip(voc['classes'].reshape(-1).tolist(), voc['map_per_class'].reshape(-1).tolist(), strict=True))
        for cls, ap in zip(coco['classes'].reshape(-1).tolist(), coco['map_per_class'].reshape(-1).tolist(),
                           strict=True):
            name = self.class_names[cls] if 0 <= cls < len(self.class_names) else str(cls)
            per_class[name] = {'ap_50': _number(torch.tensor(ap50.get(cls, -1.0))), 'ap': _number(torch.tensor(ap))}
        return {'map_50': _number(coco['map_50']), 'map': _number(coco['map']),
                'map_75': _number(coco['map_75']), 'per_class': per_class}

    def reset(self) -> None:
        self.coco.reset()
        self.voc.reset()


class SegmentationMetric:
    """Per-class IoU and mIoU of predicted class maps (or logits) against masks with 255 = ignore."""

    def __init__(self, class_names: Sequence[str], ignore_index: int = IGNORE_INDEX):
        self.class_names = tuple(class_names)
        self.iou = MulticlassJaccardIndex(num_classes=len(self.class_names), average='none',
                                          ignore_index=ignore_index, zero_division=float('nan'))

    def to(self, device) -> 'SegmentationMetric':
        self.iou.to(device)
        return self

    def update(self, prediction: torch.Tensor, mask: torch.Tensor) -> None:
        """``prediction``: logits [B, C, H, W] or class ids [B, H, W]; ``mask``: class ids [B, H, W]."""
        if prediction.dim() == 4:
            prediction = prediction.argmax(1)
        self.iou.update(prediction.detach(), torch.as_tensor(mask).long().to(prediction.device))

    def compute(self) -> Dict[str, Any]:
        """``miou`` and ``per_class`` (name -> IoU; None for a class in neither targets nor predictions)."""
        per_class = self.iou.compute().double().cpu()
        present = ~torch.isnan(per_class)
        miou = float(per_class[present].mean()) if present.any() else float('nan')
        return {'miou': _number(torch.tensor(miou)),
                'per_class': {name: _number(v) for name, v in zip(self.class_names, per_class, strict=True)}}

    def reset(self) -> None:
        self.iou.reset()
