"""Shared test helpers: small models live in tests/models.py; this file only configures pytest."""

import os

import torch

# Tests are deterministic and sized for a 2-core machine.
torch.manual_seed(0)
os.environ.setdefault("OMP_NUM_THREADS", "1")
