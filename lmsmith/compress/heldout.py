"""The fixed held-out text now lives in `lmsmith.evaluate.heldout`; these names stay for old imports."""
from ..evaluate.heldout import HELDOUT_PARAGRAPHS, heldout_text

__all__ = ["HELDOUT_PARAGRAPHS", "heldout_text"]
