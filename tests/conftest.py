"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Runs a test module's torch ops on one thread, then restores the count.

    The tiny models and short signals of the tests are dominated by thread wake-ups: on a
    shared, busy 2-core CPU a second OpenMP thread made small forwards 10-100x slower.
    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
