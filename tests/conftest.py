import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One thread: the tiny models gain nothing from more, and two threads on a loaded 2-core machine crawl.
    torch.set_num_threads(1)
    yield
