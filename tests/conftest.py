"""Shared fixtures: the tiny preset, built once per session, on CPU, with no downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

from csm_multi.config import get_preset  # noqa: E402
from csm_multi.model import CSM  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return CSM(tiny_config).init_random_(seed=1).eval()
