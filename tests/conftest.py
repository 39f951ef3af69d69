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


@pytest.fixture(scope="session")
def qwen2_import(tmp_path_factory):
    """``make(heads, kv_heads)``: overrides that start the tiny APEX runs (tests/test_apex_*.py: 4 layers, hidden 64,
    FFN 128, vocabulary 256) from a Qwen2 of that shape imported from transformers: random Q/K/V biases (and
    norms), so a bias entry left behind by a move or a fuse changes the function."""
    pytest.importorskip("transformers")
    from families import make_family
    from megatron_apex.convert.importer import import_hf_checkpoint

    made = {}

    def make(heads: int = 8, kv_heads: int = 8) -> dict:
        if (heads, kv_heads) not in made:
            d = tmp_path_factory.mktemp(f"qwen2_{heads}_{kv_heads}")
            src = make_family(d / "hf", "qwen2", vocab=256, layers=4, heads=heads, kv_heads=kv_heads, hidden=64,
                              ffn=128)
            import_hf_checkpoint(src, str(d / "ckpt"), progress=False)
            made[heads, kv_heads] = {"model.add_qkv_bias": True, "model.num_attention_heads": heads,
                                     "model.num_query_groups": kv_heads, "checkpoint.finetune_from": str(d / "ckpt")}
        return dict(made[heads, kv_heads])

    return make


@pytest.fixture(scope="session")
def qwen2_start(qwen2_import):
    """:func:`qwen2_import` of 8 heads in 8 query groups."""
    return qwen2_import(8, 8)
