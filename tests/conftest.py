import shutil

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (the machine's other core stays for the rest), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dead_ps() -> str:
    """A PS control endpoint where nothing listens (a control service then runs with its PS unreachable)."""
    from services.common.launch import free_port

    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def prometheus_binary():
    """The Debian prometheus binary (scripts/install-test-tools.sh installs it); missing is a failure."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("the prometheus binary is missing: run scripts/install-test-tools.sh")
    return path
