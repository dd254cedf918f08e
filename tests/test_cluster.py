"""Task LoRAs trained as Ray tasks land exactly as local ones; failures are named while the others land."""

import shutil
import sys

import pytest
import torch
from typer.testing import CliRunner

from runtime.artifacts import load_artifact
from sglora_edge.backbone import create_backbone
from sglora_edge.cli import app
from sglora_edge.config import ExpertConfig, LoRASpec
from sglora_edge.data import load_dataset
from sglora_edge.experts import Executor, ExecutorError, task_file, train_experts

CFG = ExpertConfig(epochs=4, keep_last=2)


def broken_world(micro_world, tmp_path, task):
    """A copy of the world, loaded, then one task's train images deleted: that task fails when it trains."""
    root = tmp_path / "world"
    shutil.copytree(micro_world, root)
    ds = load_dataset(root)
    for p in ds.split_pairs("train", task):
        p.image.unlink(missing_ok=True)
    return ds


def setup(micro_world):
    bb = create_backbone("open_clip:sglora-micro@random")
    return load_dataset(micro_world), bb, LoRASpec.for_visual(bb.visual, rank=2)


def test_missing_ray_names_the_extra(micro_world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    r = CliRunner().invoke(app, ["train-experts", "--data", str(micro_world), "--backbone",
                                 "open_clip:sglora-micro@random", "--out", str(tmp_path / "ex"), "--tasks", "apple",
                                 "--executor", "ray"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: --executor ray needs Ray: pip install 'sglora-edge[cluster]'"
    assert not (tmp_path / "ex").exists()


def test_a_failing_task_is_named_and_the_others_land(micro_world, tmp_path):
    _, bb, spec = setup(micro_world)
    ds = broken_world(micro_world, tmp_path, "bus")
    with pytest.raises(ExecutorError) as e:
        train_experts(bb, spec, ds, ["bus", "apple"], tmp_path / "ex", CFG, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("1 of 2 task(s) failed") and "'bus' (FileNotFoundError" in msg
    assert task_file(tmp_path / "ex", "apple").is_file() and not task_file(tmp_path / "ex", "bus").exists()


@pytest.mark.slow  # ~25 s of Ray and worker start-up on 2 cores, and a 330 MiB install: `make test-all` only
def test_ray_matches_local_resumes_and_names_failures(micro_world, tmp_path):
    ray = pytest.importorskip("ray", reason="needs the 'cluster' extra (make test-all installs it)")
    ds, bb, spec = setup(micro_world)
    tasks = ["apple", "bus", "saw sketch"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray task with 1 CPU trains on 1 thread: same thread count, same bytes
    try:
        local = train_experts(bb, spec, ds, tasks, tmp_path / "local", CFG, progress=False)
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "ray").mkdir()
    shutil.copy(task_file(tmp_path / "local", tasks[0]), task_file(tmp_path / "ray", tasks[0]))  # already done
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        got = train_experts(bb, spec, ds, tasks, tmp_path / "ray", CFG, progress=False,
                            executor=Executor("ray", cpus_per_task=1))
        broken = broken_world(micro_world, tmp_path, "bus")
        with pytest.raises(ExecutorError, match=r"^1 of 2 task\(s\) failed.*'bus' \(FileNotFoundError"):
            train_experts(bb, spec, broken, ["bus", "apple"], tmp_path / "ray_broken", CFG, progress=False,
                          executor=Executor("ray"))
    finally:
        ray.shutdown()
    assert task_file(tmp_path / "ray", tasks[0]).read_bytes() == task_file(tmp_path / "local", tasks[0]).read_bytes()
    assert got[tasks[0]] == local[tasks[0]]  # resumed, not retrained
    for t in tasks[1:]:
        (a, meta_a), (b, meta_b) = (load_artifact(task_file(tmp_path / d, t)) for d in ("local", "ray"))
        assert a["lora"].tobytes() == b["lora"].tobytes()
        assert {k: v for k, v in meta_a.items() if k != "info"} == {k: v for k, v in meta_b.items() if k != "info"}
        assert got[t]["node"] and got[t]["device"] == "cpu" and "seconds" in got[t]  # recorded, never compared
    assert task_file(tmp_path / "ray_broken", "apple").is_file()
    assert not task_file(tmp_path / "ray_broken", "bus").exists()
