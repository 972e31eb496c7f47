import os

import pytest
import torch

# Two cores shared by the whole suite: keep intra-op threads low and results repeatable.
torch.set_num_threads(int(os.environ.get("EASYANIMATE_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
