import numpy as np
import pytest

from sglora_edge.metrics import mean_r1, mean_recalls, positives_from_captions, recall_at_k


def test_recall_hand_computed_with_multiple_captions():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    pos = positives_from_captions(np.array([0, 0, 1, 2]), 3)
    sim = np.array([
        [0.1, 0.9, 0.5, 0.2],  # image 0: best own caption (0.9) is ranked 1st -> found at 1
        [0.8, 0.1, 0.7, 0.3],  # image 1: own caption 0.7, one negative above -> rank 2
        [0.6, 0.5, 0.4, 0.1],  # image 2: own caption 0.1, three negatives above -> rank 4
    ])
    r = recall_at_k(sim, pos, ks=(1, 2, 5))
    assert r["i2t"] == pytest.approx({"r1": 100 / 3, "r2": 200 / 3, "r5": 100.0})
    # t2i per caption: c0 own img0 0.1 vs 0.8,0.6 -> rank 3; c1 0.9 -> 1; c2 img1 0.7 vs 0.5,0.4 -> 1; c3 img2 0.1 -> 3
    assert r["t2i"] == pytest.approx({"r1": 50.0, "r2": 50.0, "r5": 100.0})


def test_a_caption_text_shared_by_two_images_finds_either():
    # caption 0 describes images 0 and 1 (same text), caption 1 describes image 2
    pos = np.array([[True, False], [True, False], [False, True]])
    sim = np.array([[0.2, 0.1], [0.9, 0.3], [0.5, 0.4]])
    r = recall_at_k(sim, pos, ks=(1, 2))
    # t2i: caption 0's best positive is image 1 (0.9) -> rank 1; caption 1: image 2 (0.4) vs images 0,1 (0.1,0.3) -> 1
    assert r["t2i"] == {"r1": 100.0, "r2": 100.0}
    # i2t: image 0 own 0.2 > 0.1 -> 1; image 1 0.9 -> 1; image 2 own 0.4 < 0.5 -> rank 2
    assert r["i2t"] == pytest.approx({"r1": 200 / 3, "r2": 100.0})


def test_ties_count_against_the_query():
    pos = np.eye(4, dtype=bool)
    r = recall_at_k(np.zeros((4, 4)), pos, ks=(1, 4))
    assert r["i2t"] == {"r1": 0.0, "r4": 100.0} and r["t2i"] == {"r1": 0.0, "r4": 100.0}


def test_perfect_and_shape_errors():
    assert recall_at_k(np.eye(3), np.eye(3, dtype=bool))["i2t"]["r1"] == 100.0
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(np.eye(3), np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="at least one"):
        recall_at_k(np.eye(3), positives_from_captions(np.array([0, 0, 1]), 3))


def test_mean_recalls():
    a = {"i2t": {"r1": 10.0}, "t2i": {"r1": 20.0}}
    b = {"i2t": {"r1": 30.0}, "t2i": {"r1": 40.0}}
    assert mean_recalls({"a": a, "b": b}) == {"i2t": {"r1": 20.0}, "t2i": {"r1": 30.0}}


def test_mean_r1_averages_the_two_directions():
    assert mean_r1({"i2t": {"r1": 50.0, "r5": 90.0}, "t2i": {"r1": 25.0, "r5": 80.0}}) == 37.5


def test_compare_gives_interval_power_and_a_variance_split():
    from sglora_edge.metrics import compare
    rng = np.random.default_rng(0)
    task_effect = rng.normal(0, 3, size=40)
    row = lambda galleries: {"i2t": {"r1": float(np.mean(galleries))}, "t2i": {"r1": float(np.mean(galleries))},
                             "gallery_r1": list(map(float, galleries))}
    b = [row(np.full(3, 20.0)) for _ in task_effect]
    a = [row(20 + 1 + e + rng.normal(0, 1, size=3)) for e in task_effect]
    c = compare(a, b)
    assert c["n_tasks"] == 40 and c["ci95"][0] < c["diff"] < c["ci95"][1]
    assert c["mde80"] == pytest.approx(2.8 * c["se"], rel=0.05)  # (1.96 + 0.84) x SE for many tasks
    v = c["variance"]
    assert v["galleries_per_task"] == 3 and v["total"] == pytest.approx(v["between_tasks"] + v["between_galleries"])
    assert v["between_tasks"] > 5 * v["between_galleries"]  # task SD 3 vs gallery SD 1 / sqrt(3)
    assert "variance" not in compare([{k: x[k] for k in ("i2t", "t2i")} for x in a], b)  # no galleries: no split
