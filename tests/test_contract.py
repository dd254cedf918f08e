import json

import pytest
from PIL import Image

from sglora_edge.data import DatasetError, load_dataset


def make(tmp_path, rows, tasks=None, images=("a.png", "b.png")):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / name)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if tasks is not None:
        (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    return tmp_path


def row(image="images/a.png", caption="a red cat", task="cat", split="test", **kw):
    return {"image": image, "caption": caption, "task": task, "split": split, **kw}


def problems(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    return e.value.problems


def test_valid_dataset_gallery_groups_captions(tmp_path):
    make(tmp_path, [row(), row(caption="a cat in red"), row(image="images/b.png"), row(image="images/b.png"),
                    row(task="dog", split="train"), row(task="dog", split="pretrain", caption="a dog")],
         tasks={"cat": {"description": "a photo of a cat", "role": "unseen", "family": "pets"},
                "dog": {"description": "a photo of a dog", "role": "expert"}})
    ds = load_dataset(tmp_path)
    g = ds.gallery("cat")
    assert len(g.images) == 2 and g.captions == ["a red cat", "a cat in red"]  # identical texts are one query
    assert g.positive.tolist() == [[True, True], [True, False]]
    assert ds.tasks["cat"].family == "pets" and ds.tasks["dog"].role == "expert"
    assert ds.role_source == "tasks.json"
    assert ds.summary()["splits"]["test"] == {"images": 2, "captions": 4, "tasks": 1}


def test_without_tasks_json_roles_are_seeded_and_recorded(tmp_path):
    rows = [row(task=f"t{i}", split=s) for i in range(6) for s in ("train", "test")]
    make(tmp_path, rows)
    a, b = load_dataset(tmp_path), load_dataset(tmp_path)
    assert {t.role for t in a.tasks.values()} == {"expert", "train", "unseen"}
    assert {n: t.role for n, t in a.tasks.items()} == {n: t.role for n, t in b.tasks.items()}
    assert "seeded" in a.role_source
    assert a.tasks["t0"].description == "a photo of a t0"


def test_each_violation_names_file_line_and_field(tmp_path):
    make(tmp_path, [row(), "{not json", row(split="holdout"), {"image": "images/a.png", "task": "cat", "split": "test"},
                    row(caption="   ")])
    found = problems(tmp_path)
    text = "\n".join(found)
    assert "manifest.jsonl:2: not valid JSON" in text
    assert "manifest.jsonl:3: field 'split' is 'holdout'" in text
    assert "manifest.jsonl:4: field 'caption' is missing" in text
    assert "manifest.jsonl:5: field 'caption'" in text
    assert len(found) == 4


def test_missing_images_are_counted_and_named(tmp_path):
    make(tmp_path, [row(image=f"images/gone{i}.png") for i in range(7)] + [row()])
    (msg,) = problems(tmp_path)
    assert msg.startswith("7 of 8 image(s) are missing or unreadable")
    assert "gone0.png" in msg and "gone6.png" not in msg  # the first few are named, not all


def test_unreadable_image_found_when_decoding(tmp_path):
    make(tmp_path, [row(), row(image="images/bad.png")])
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    load_dataset(tmp_path)  # exists: fine
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset(tmp_path, check_images="decode")


def test_tasks_json_problems(tmp_path):
    make(tmp_path, [row(), row(task="dog", split="train")],
         tasks={"cat": {"description": "", "role": "teacher"}, "ghost": {"role": "expert"}})
    text = "\n".join(problems(tmp_path))
    assert "task 'cat': field 'description' must be a non-empty string" in text
    assert "task 'cat': field 'role' is 'teacher'" in text
    assert "task 'dog' appears in manifest.jsonl but has no entry" in text
    assert "task 'ghost' has no train/val/test pairs" in text


def test_unseen_task_needs_a_test_gallery(tmp_path):
    make(tmp_path, [row(split="train")], tasks={"cat": {"role": "unseen"}})
    assert "has no 'test' pairs" in problems(tmp_path)[0]


def test_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="manifest.jsonl: not found"):
        load_dataset(tmp_path)


def test_data_check_cli_exit_codes(tmp_path):
    from typer.testing import CliRunner

    from sglora_edge.cli import app
    make(tmp_path, [row(), row(task="dog", split="train")])
    ok = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row(split="nope")) + "\n")
    bad = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert bad.exit_code == 1
