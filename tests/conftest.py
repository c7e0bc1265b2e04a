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


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (the Makefile's), except that the family contract's tests go out by family: a file's tests
    share their module-scoped fixtures in one process, and the contract's are per family (`tests/helpers.py`)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByFileAndFamily(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path, _, test = nodeid.partition("::")
            if path.endswith("test_family_contract.py") and "[" in test:
                return f"{path}::{test.split('[', 1)[1].split('-', 1)[0].rstrip(']')}"
            return path

    return ByFileAndFamily(config, log)
