"""What a segmenter's output means at inference: the lesion probabilities of its final map.

A network trained with positive-pixel weights w in its BCE term (`train.positive_weights`,
`tfcovseg.training.losses`) learns inflated probabilities: the weighted BCE is smallest at
q = w p / (w p + 1 - p) for a pixel whose true probability is p, so thresholding q at 0.5
marks pixels that are lesion with probability 1 / (1 + w) (0.09 for w = 10: recall bought
with precision). `unweighted_probabilities` inverts that map, p = q / (q + w (1 - q)),
so that 0.5 means 0.5 again for every class. The IoU and SSIM terms are not weighted, so
the inverse is the BCE's, not exact; on the quickstart it raised the validation Dice of
consolidation from 0.43 to 0.54 and of fibrosis from 0.62 to 0.68, GGO (w = 1) unchanged
(docs/results-phantom.md).

Every inference path takes the final map through `final_probabilities`: evaluation, the
lesion-burden and gate calibration, the export's serving graph (and so predict, TF Serving
and ONNX) and self-training's pseudo-labels. Training losses and metrics see the raw map.
"""

from __future__ import annotations

from keras import ops


def unweighted_probabilities(probs, positive_weights=None):
    """`probs` [..., C] as a model trained without `positive_weights` (one per channel;
    None, empty or all 1: unchanged) would give them, p = q / (q + w (1 - q))."""
    weights = tuple(float(w) for w in positive_weights or ())
    if not weights or all(w == 1.0 for w in weights):
        return probs
    w = ops.convert_to_tensor(weights, dtype=probs.dtype if hasattr(probs, "dtype") else None)
    return probs / ops.maximum(probs + w * (1.0 - probs), 1e-12)


def final_probabilities(outputs, positive_weights=None):
    """The final lesion probabilities of a segmenter's outputs (a dict with "final", or
    the map itself), corrected for the loss's positive weights."""
    final = outputs["final"] if isinstance(outputs, dict) else outputs
    return unweighted_probabilities(final, positive_weights)
