"""Fresh random inputs for every test; the seed is returned so a failure message can name it."""

import os

import pytest
import torch


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value

