import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run with one torch thread, as the trainer does by default."""
    torch.set_num_threads(1)
    yield
