"""Garbage-collector tuning of the long-running processes (kme.operations.collector)."""
import gc

import pytest
from kme.operations import collector

pytestmark = pytest.mark.engine_independent


def test_tuning_freezes_the_objects_alive_and_collects_the_young_less_often():
    before = gc.get_threshold()
    try:
        collector.tune()
        assert gc.get_threshold() == collector.THRESHOLDS and collector.THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
