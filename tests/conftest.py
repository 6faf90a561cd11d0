"""Shared test settings."""

import socket

import pytest
import torch

# The test models are tiny: one thread avoids the synchronisation cost that dominates their ops
# (and the oversubscription of a busy machine). Subprocess tests set their own threads.
torch.set_num_threads(1)


@pytest.fixture
def without_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may be downloaded at run time."""
    def refused(*_args):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket.socket, "connect", refused)
