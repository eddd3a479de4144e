import os

import pytest
import torch

# Each xdist worker gets one thread so two workers share the two cores without oversubscription.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
