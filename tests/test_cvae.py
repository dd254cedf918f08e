import numpy as np
import torch

from sglora_edge.config import CVAEConfig
from sglora_edge.cvae import SemanticCVAE


def toy(n_cond=6, per=40, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_cond, size, generator=g)
    mu = centres.repeat_interleave(per, 0)
    var = torch.full_like(mu, 0.01)
    x = 2.0 * mu + 0.5 + 0.1 * torch.randn(mu.shape, generator=g)  # X | c ~ N(2 mu + 0.5, 0.01)
    return centres, x, mu, var


def fit(cfg, x, mu, var, steps=600):
    torch.manual_seed(0)
    model = SemanticCVAE(x.shape[1], 2, cfg)
    model.fit_statistics(model.target(x, mu), mu, var)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        out = model.losses(x, mu, var)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval(), out


def test_prior_samples_centre_on_the_conditional_mean():
    centres, x, mu, var = toy()
    cfg = CVAEConfig(latent=4, hidden=64, cond_per_block=4)
    model, out = fit(cfg, x, mu, var)
    assert torch.isfinite(out["loss"])
    assert out["kl_per_dim"].shape == (4,)
    errors, spreads = [], []
    for c in centres:
        s = model.sample(c, torch.full_like(c, 0.01), 200, torch.Generator().manual_seed(1))
        errors.append((s.mean(0) - (2 * c + 0.5)).abs().max().item())
        spreads.append(s.std(0).mean().item())
    between = torch.cdist(2 * centres, 2 * centres).masked_fill(torch.eye(len(centres), dtype=torch.bool), 1e9).min()
    assert max(errors) < 0.1 * between.item()  # each condition's samples sit at its own mean
    assert np.mean(spreads) < 0.5  # and are not spread across conditions


def test_residual_untrained_decoder_scale_and_mean_decoding():
    centres, x, mu, var = toy(n_cond=3, per=5)
    cfg = CVAEConfig(latent=4, hidden=16, cond_per_block=2, residual=True)
    model = SemanticCVAE(x.shape[1], 2, cfg)
    model.fit_statistics(model.target(x, mu), mu, var)
    a = model.sample(centres[0], var[0], 3, use_mean=True)
    assert torch.allclose(a[0], a[1]) and torch.allclose(a[0], a[2])  # the prior mean is deterministic
    loss_sum = model.losses(x, mu, var)["recon"]
    model.cfg = CVAEConfig(latent=4, hidden=16, cond_per_block=2, residual=True, recon="mean")
    torch.manual_seed(0)
    assert model.losses(x, mu, var)["recon"] < loss_sum  # mean is the sum / P


def test_anchor_returns_the_condition_exactly_while_the_correction_is_zero():
    centres, x, mu, var = toy(n_cond=3, per=5)
    cfg = CVAEConfig(latent=4, hidden=16, cond_per_block=2, anchor=True)
    model = SemanticCVAE(x.shape[1], 2, cfg)
    model.fit_statistics(model.target(x, mu), mu, var)
    assert torch.equal(model.x_mean, torch.zeros_like(model.x_mean))  # scaled, never shifted
    for use_mean in (True, False):
        s = model.sample(centres[0], var[0], 3, torch.Generator().manual_seed(0), use_mean=use_mean)
        assert torch.equal(s, centres[0].expand(3, -1))
    with torch.no_grad():
        model.decoder[-1].bias.add_(1.0)  # a non-zero correction moves it off mu*
    assert not torch.allclose(model.sample(centres[0], var[0], 1, use_mean=True)[0], centres[0])


def test_residual_and_anchor_are_exclusive():
    import pytest
    with pytest.raises(ValueError, match="one of residual and anchor"):
        CVAEConfig(residual=True, anchor=True)
