"""Test setup shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is imported anywhere, so it is set here, first. Each test gets a fresh random seed (printed in the
header and on failure) unless IWM_TEST_SEED pins one, so tests never run on one lucky input forever.
"""
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from iwm_kernels import _backend  # noqa: E402

_SESSION_SEED = int(os.environ.get("IWM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    avail = _backend.available_backends()
    lines = [f"iwm test seed: {_SESSION_SEED} (set IWM_TEST_SEED to reproduce)"]
    lines += [f"backend {name}: {'yes' if a.available else 'no'} - {a.detail}" for name, a in avail.items()]
    return lines


@pytest.fixture
def seed(request):
    """A per-test seed derived from the session seed and the test's id; also seeds torch and random."""
    s = (_SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(s)
    random.seed(s)
    request.node.user_properties.append(("seed", s))
    return s


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(call.when, "seed", f"test seed {value} (session seed {_SESSION_SEED})")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
