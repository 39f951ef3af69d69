import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
TINY = os.path.join(ROOT, "examples", "tiny_cpu.yaml")


def pytest_configure(config):
    """Tests that start process groups in the test process itself do what the entry points do."""
    from megatron_apex.compat.cpu import apply_cpu_patches

    apply_cpu_patches()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from helpers import make_indexed_dataset

    d = tmp_path_factory.mktemp("data")
    return make_indexed_dataset(str(d / "tiny_text_document"))


@pytest.fixture(scope="session")
def tiny_config():
    return TINY
