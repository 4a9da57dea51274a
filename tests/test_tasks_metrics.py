"""The dense metrics against hand-made boxes and masks whose mAP / IoU are known."""
import pytest
import torch

from pce_timm.tasks import DetectionMetric, SegmentationMetric

CLASSES = ('background', 'cat', 'dog')


def _pred(boxes, scores, labels):
    return {'boxes': torch.tensor(boxes, dtype=torch.float32), 'scores': torch.tensor(scores),
            'labels': torch.tensor(labels)}


def _gt(boxes, labels, difficult=None):
    t = {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.tensor(labels)}
    if difficult is not None:
        t['difficult'] = torch.tensor(difficult)
    return t


def test_perfect_detections_score_one():
    metric = DetectionMetric(CLASSES)
    metric.update([_pred([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])],
                  [_gt([[0, 0, 10, 10], [20, 20, 40, 40]], [1, 2])])
    out = metric.compute()
    assert out['map_50'] == 1.0 and out['map'] == 1.0
    assert out['per_class'] == {'cat': {'ap_50': 1.0, 'ap': 1.0}, 'dog': {'ap_50': 1.0, 'ap': 1.0}}


def test_a_missed_box_halves_its_class_and_iou_between_thresholds_counts_at_half_only():
    metric = DetectionMetric(CLASSES)
    # cat: one of two boxes found -> AP 0.5 (recall stops at 0.5, precision 1)
    # dog: IoU 0.6 with its only box (shifted by 4 px of 20 -> 16x20 / (24x20) = 0.667): a hit at IoU 0.5-0.65
    metric.update([_pred([[0, 0, 10, 10], [24, 20, 44, 40]], [0.9, 0.8], [1, 2])],
                  [_gt([[0, 0, 10, 10], [60, 60, 70, 70], [20, 20, 40, 40]], [1, 1, 2])])
    out = metric.compute()
    assert out['per_class']['cat']['ap_50'] == pytest.approx(0.5, abs=0.01)
    assert out['per_class']['dog']['ap_50'] == pytest.approx(1.0)
    # dog at COCO's 10 thresholds 0.5..0.95: a hit at 0.5, 0.55, 0.6, 0.65 (IoU 0.667) -> 4 / 10
    assert out['per_class']['dog']['ap'] == pytest.approx(0.4, abs=0.01)
    assert out['map_50'] == pytest.approx(0.75, abs=0.01)


def test_difficult_boxes_are_neither_hits_nor_misses():
    metric = DetectionMetric(CLASSES)
    # the dog detection lands on a difficult dog box (ignored); the other dog box is missed -> dog AP 0
    # cat: its difficult box is not found and costs nothing -> cat AP 1
    metric.update([_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [1, 2])],
                  [_gt([[0, 0, 10, 10], [80, 80, 90, 90], [50, 50, 60, 60], [20, 20, 30, 30]], [1, 1, 2, 2],
                       difficult=[False, True, False, True])])
    out = metric.compute()
    assert out['per_class']['cat']['ap_50'] == 1.0
    assert out['per_class']['dog']['ap_50'] == 0.0
    assert out['map_50'] == pytest.approx(0.5)


def test_iou_per_class_and_mean_over_present_classes():
    metric = SegmentationMetric(CLASSES)
    mask = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])  # the ignored pixel's prediction does not count
    metric.update(pred, mask)
    out = metric.compute()
    # background: 3 hits, union 4; cat: 3 hits of 4 target and 3 counted predictions -> 3 / 4; dog absent
    assert out['per_class'] == {'background': 0.75, 'cat': 0.75, 'dog': None}
    assert out['miou'] == 0.75
    logits = torch.nn.functional.one_hot(torch.tensor([[[2, 2], [0, 0]]]), 3).permute(0, 3, 1, 2).float()
    metric.reset()
    metric.update(logits, torch.tensor([[[2, 0], [0, 0]]]))
    out = metric.compute()  # dog: 1 / 2, background 2 / 3, cat absent
    assert out['per_class']['dog'] == 0.5 and out['per_class']['background'] == pytest.approx(2 / 3, abs=1e-6)
    assert out['miou'] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-6)
