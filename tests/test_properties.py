"""Property-based tests (hypothesis) of the pure evaluators."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from camloc.evaluators import LocalizationMeter, box_from_heatmap, box_iou

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
heatmaps = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda hw: arrays(np.float32, hw, elements=finite))
thresholds = st.one_of(st.just("otsu"), st.floats(0, 1))


@settings(max_examples=300, deadline=None)
@given(heatmaps, thresholds)
def test_box_from_heatmap_is_always_a_box_inside_the_image(heatmap, threshold):
    h, w = heatmap.shape
    x1, y1, x2, y2 = box_from_heatmap(heatmap, threshold)
    assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


coord = st.floats(0, 500, allow_nan=False)
boxes = st.tuples(coord, coord, coord, coord).map(lambda b: [min(b[0], b[2]), min(b[1], b[3]),
                                                             max(b[0], b[2]), max(b[1], b[3])])


@settings(max_examples=500, deadline=None)
@given(boxes, boxes, st.sampled_from(["gscorecam", "coco"]))
def test_iou_in_unit_interval_and_symmetric(a, b, convention):
    iou = box_iou(a, b, convention)
    assert 0.0 <= iou <= 1.0
    assert iou == box_iou(b, a, convention)


@settings(max_examples=200, deadline=None)
@given(boxes)
def test_iou_of_a_box_with_itself(a):
    if a[2] - a[0] > 1e-3 and a[3] - a[1] > 1e-3:
        assert abs(box_iou(a, a, "coco") - 1.0) < 1e-9
        area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
        assert abs(box_iou(a, a) - area / (area + 1e-6)) < 1e-9


pairs = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["cat", "dog", "sky"])), max_size=60)


@settings(max_examples=200, deadline=None)
@given(pairs, st.lists(st.integers(0, 3), max_size=60))
def test_meter_merge_equals_meter_of_union(items, assignment):
    whole, parts = LocalizationMeter(), [LocalizationMeter() for _ in range(4)]
    for i, (iou, cat) in enumerate(items):
        whole.update(iou, cat)
        parts[assignment[i] if i < len(assignment) else 0].update(iou, cat)
    merged = parts[3] + parts[1] + parts[0] + parts[2]
    a, b = merged.compute(), whole.compute()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert (np.isnan(a[key]) and np.isnan(b[key])) or a[key] == b[key]
        else:  # the mean IoU's interval: a list, or None under two pairs
            assert a[key] == b[key]
    assert merged.compute_per_class() == whole.compute_per_class()
