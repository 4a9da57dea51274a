"""Fixtures shared by the test modules that train (they opt in with ``pytestmark``)."""
import pytest
import torch
from accelerate.state import AcceleratorState


@pytest.fixture
def one_thread_fresh_accelerate():
    """One torch thread (2 shared cores) and a fresh accelerate state per test (it is a process singleton)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)
