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
