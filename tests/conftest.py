import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores here; fixed thread count keeps float reductions reproducible within a test.
    torch.set_num_threads(2)
    yield
