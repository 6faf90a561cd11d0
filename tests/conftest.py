"""Shared test settings."""

import torch

# The test models are tiny: one thread avoids the synchronisation cost that dominates their ops
# (and the oversubscription of a busy machine). Subprocess tests set their own threads.
torch.set_num_threads(1)
