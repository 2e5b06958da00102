import importlib.util
import os
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

# tiny shapes: one thread is fastest, and immune to OpenMP oversubscription on a busy machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ksampling():
    """k-diffusion's sampling.py, the independent oracle, without its heavy package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (make install-test installs it)")
    if "k_diffusion" not in sys.modules:
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
    import k_diffusion.sampling as ks

    return ks
