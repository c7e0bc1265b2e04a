import pytest
import torch


# One thread: the tiny models gain nothing from more, and two threads on a loaded 2-core machine crawl. Set at import
# too, so that module- and session-scoped fixtures (which run before function-scoped ones) get it.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests that change the thread count must not leak it into the next test.
    torch.set_num_threads(1)
    yield
