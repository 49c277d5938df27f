import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. Triton reads TRITON_INTERPRET when a
# function is decorated with @triton.jit, including its own standard library at `import triton`,
# so it must be set before anything (transformers, the kernel tests) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test shapes are tiny: one thread avoids OpenMP hand-off costs that dominate on 2 shared cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
