"""Measuring lives in lmsmith.evaluate; compress's old names are the same objects, not copies."""
import pytest

import lmsmith.compress.batches as compress_batches
import lmsmith.compress.heldout as compress_heldout
import lmsmith.compress.report as compress_report
from lmsmith.compress import quantize
from lmsmith.evaluate import batches, heldout, measure, memory


def test_compress_names_are_the_evaluate_implementations():
    for name in ("EvalSet", "Measurement", "MeasureSettings", "classifier_eval_set", "lm_eval_set", "measure",
                 "quality_metrics", "MAIN_METRIC"):
        assert getattr(compress_report, name) is getattr(measure, name), name
    for name in ("MemoryTracker", "count_parameters", "size_on_disk"):
        assert getattr(compress_report, name) is getattr(memory, name), name
    assert quantize.model_size_bytes is memory.model_size_bytes
    assert quantize.release_freed_heap is memory.release_freed_heap
    for name in ("pad_id_of", "lm_blocks", "lm_batches", "classification_batches"):
        assert getattr(compress_batches, name) is getattr(batches, name), name
    assert compress_heldout.heldout_text is heldout.heldout_text
    assert len(heldout.heldout_text()) > 4000


def test_lazy_package_exports():
    import lmsmith.evaluate as ev

    assert ev.evaluate.__module__ == "lmsmith.evaluate.run" and ev.EvalReport.__name__ == "EvalReport"
    assert all(callable(getattr(ev, name)) or isinstance(getattr(ev, name), type) for name in ev.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        ev.no_such_name  # noqa: B018
