import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py helpers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
IDEFICS2_8B = os.path.join(FIXTURES, "idefics2-8b")

# Two cores: keep torch from oversubscribing them in the test run.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def fixture_8b_dir() -> str:
    return IDEFICS2_8B
