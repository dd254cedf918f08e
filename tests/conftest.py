import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# `run` caches gallery activations in the user's cache folder by default: never the real one in tests
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sglora-test-cache-")


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The micro embedded world, generated once per test session."""
    from sglora_edge.world import write_world
    out = tmp_path_factory.mktemp("world") / "micro"
    write_world(out, seed=0, preset="micro", progress=False)
    return out


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory):
    """A random-weight sglora-micro bundle through the real export path (bench and OpenVINO tests share it)."""
    import torch

    from export.synthetic import SYNTHETIC, build_bundle
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_bundle(tmp_path_factory.mktemp("micro-bundle"), *SYNTHETIC["sglora-micro"], last_blocks=0)[0]
    finally:
        torch.set_num_threads(threads)
