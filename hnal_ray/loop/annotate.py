"""Annotators turn selected pool items into new pairs; the built-in one is a simulated oracle."""
from __future__ import annotations

import numpy as np


class OracleAnnotator:
    """Reveals held-back ground truth: all captions of a selected image (the paper's scenario);
    on the text side, the image of a selected text (that text-image pair is added)."""

    def __init__(self, text_ids: np.ndarray, text_owner: np.ndarray):
        self.text_ids, self.text_owner = text_ids, text_owner

    def annotate(self, side: str, selected: np.ndarray) -> np.ndarray:
        """Selected pool ids (image ids on the image side, text ids on the text side) ->
        the text ids that become paired (each text is paired with its image)."""
        if side == "image":
            return np.sort(self.text_ids[np.isin(self.text_owner, selected)])
        known = np.isin(selected, self.text_ids)
        if not known.all():
            raise ValueError(f"texts {selected[~known][:5].tolist()} are unknown to the annotator")
        return np.sort(selected)
