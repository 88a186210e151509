import os

import pytest
import torch

# Tests run on CPU; fix threads so timings and numerics do not depend on the runner.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pipelines():
    """One tiny pipeline per kind, built once (building costs more than a 4-step run)."""
    from vidaccel.testing import KINDS, tiny_pipeline

    return {kind: tiny_pipeline(kind) for kind in KINDS}
