import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (the machine's other core stays for the rest), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
