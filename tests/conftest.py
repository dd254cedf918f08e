import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The micro embedded world, generated once per test session."""
    from sglora_edge.world import write_world
    out = tmp_path_factory.mktemp("world") / "micro"
    write_world(out, seed=0, preset="micro", progress=False)
    return out
