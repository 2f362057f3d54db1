"""Heatmap -> box (Algorithm 1), box IoU, and localization meters."""
from camloc.evaluators.boxes import binarize, box_from_heatmap, candidate_boxes, heatmap_to_uint8, largest_box
from camloc.evaluators.iou import best_iou, box_iou
from camloc.evaluators.meter import THRESHOLDS, LocalizationMeter, meters_by

__all__ = ["THRESHOLDS", "LocalizationMeter", "meters_by", "best_iou", "binarize", "box_from_heatmap", "box_iou",
           "candidate_boxes", "heatmap_to_uint8", "largest_box"]
