import numpy as np
import pytest

from runtime.aggregate import aggregate, softmax_weights


def library():
    names = ["a", "b", "c"]
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    mu = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0]])
    var = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])
    return names, emb, mu, var


def test_hand_computed_aggregation_with_total_variance():
    names, emb, mu, var = library()
    q = np.array([2.0, 0.0])  # unnormalised on purpose: cosine similarity 1.0, 0.6, 0.0
    agg = aggregate(names, emb, mu, var, q, k=2, tau=0.2)
    assert agg.experts == ["a", "b"]
    assert agg.similarities == pytest.approx([1.0, 0.6])
    w = np.exp([1.0 / 0.2, 0.6 / 0.2]); w /= w.sum()  # softmax(sim / tau) over the top-2
    assert agg.weights == pytest.approx(w.tolist())
    m = w[0] * mu[0] + w[1] * mu[1]
    v = w[0] * var[0] + w[1] * var[1] + w[0] * (mu[0] - m) ** 2 + w[1] * (mu[1] - m) ** 2
    assert agg.mu == pytest.approx(m, rel=1e-6)
    assert agg.var == pytest.approx(v, rel=1e-6)
    assert agg.var[1] > w @ var[:2, 1]  # the between-expert term adds spread
    assert agg.best_similarity == pytest.approx(1.0)


def test_leave_one_out_and_equal_weights():
    names, emb, mu, var = library()
    agg = aggregate(names, emb, mu, var, np.array([1.0, 0.0]), k=2, tau=0.1, exclude={"a"})
    assert agg.experts == ["b", "c"]
    soup = aggregate(names, emb, mu, var, np.array([1.0, 0.0]), k=2, weights=np.array([0.5, 0.5]))
    assert soup.mu == pytest.approx((mu[0] + mu[1]) / 2)


def test_bad_k_and_tau():
    names, emb, mu, var = library()
    with pytest.raises(ValueError, match="K=4 but the library offers 3"):
        aggregate(names, emb, mu, var, np.array([1.0, 0.0]), k=4)
    with pytest.raises(ValueError, match="offers 2"):
        aggregate(names, emb, mu, var, np.array([1.0, 0.0]), k=3, exclude={"c"})
    with pytest.raises(ValueError, match="tau"):
        softmax_weights(np.array([1.0]), 0.0)
