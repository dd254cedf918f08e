"""The semantic CVAE: LoRA parameters X given the task condition c = {mu*, sigma*2}.

    encoder  q(z | X, c)  2-layer ReLU MLP -> (mean, log-variance)
    prior    p(z | c)     2-layer ReLU MLP -> (mean, log-variance)
    decoder  X | z, c     3-layer ReLU MLP
    loss = recon(X, X_hat) + lambda * KL(q || p)

Choices where the paper is silent (DESIGN.md, "Known holes"):
- c is compressed before the MLPs: mu* (standardised) and log sigma*2 (standardised) each go
  through a learned linear projection per LoRA block (`cond_per_block` numbers a block), so
  the first layer does not grow with 2P.
- X is standardised per entry with statistics stored in the artifact. `residual` decodes
  X - mu* (an untrained decoder returns mu* + the mean training residual). `anchor` decodes
  X = mu* + a correction whose last layer starts at zero and whose mean is not shifted, so an
  untrained (or zero) correction returns mu* exactly: the generator starts from Top-K weighted.
- Objective: `recon` is the paper's (reconstruct expert checkpoints + KL). `retrieval` puts the
  decoded LoRA into the frozen backbone and scores it with the contrastive loss on seen tasks'
  train splits (train_generator.py), plus `correction_penalty` * mean squared standardised
  correction and `recon_weight` * the paper's loss as a regulariser.
- Loss scale: `recon="sum"` sums the squared error over the P entries of the standardised X
  (the Gaussian ELBO with unit variance up to a factor 1/2), KL is summed over latent
  dimensions; `recon="mean"` averages instead (calibration: latent collapse, KL ~ 0.01).
- Numerics: log-variances clamped to [-8, 8], gradients clipped to norm 1, standardisation
  spreads floored at 1 % of the median spread and standardised conditions clipped to ±10.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CVAEConfig

LOGVAR_CLAMP = 8.0
VAR_EPS = 1e-10
STD_FLOOR = 1e-2  # standardisation floor, relative to the median spread of the entries
COND_CLAMP = 10.0  # standardised condition entries beyond this are clipped


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BlockProjection(nn.Module):
    """A learned linear map per LoRA block: [.., n_blocks * per_block] -> [.., n_blocks * out]."""

    def __init__(self, n_blocks: int, per_block: int, out: int):
        super().__init__()
        self.n_blocks, self.per_block = n_blocks, per_block
        self.weight = nn.Parameter(torch.randn(n_blocks, per_block, out) / per_block ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_blocks, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(*x.shape[:-1], self.n_blocks, self.per_block)
        return (torch.einsum("...bp,bpo->...bo", x, self.weight) + self.bias).flatten(-2)


class SemanticCVAE(nn.Module):
    def __init__(self, size: int, n_blocks: int, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        c = 2 * n_blocks * cfg.cond_per_block
        self.cond_mu = BlockProjection(n_blocks, size // n_blocks, cfg.cond_per_block)
        self.cond_var = BlockProjection(n_blocks, size // n_blocks, cfg.cond_per_block)
        self.encoder = mlp(size + c, cfg.hidden, 2 * cfg.latent)
        self.prior = mlp(c, cfg.hidden, 2 * cfg.latent)
        self.decoder = mlp(cfg.latent + c, cfg.hidden, cfg.hidden, size)
        if cfg.anchor:  # the correction starts at exactly zero: X = mu*
            nn.init.zeros_(self.decoder[-1].weight)
            nn.init.zeros_(self.decoder[-1].bias)
        # standardisation statistics, fitted on the training data and saved with the weights
        for name in ("x_mean", "x_std", "mu_mean", "mu_std", "lv_mean", "lv_std"):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))

    def fit_statistics(self, targets: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
        lv = torch.log(var + VAR_EPS)
        for prefix, x in (("x", targets), ("mu", mu), ("lv", lv)):
            if not (prefix == "x" and self.cfg.anchor):  # an anchored correction is scaled, never shifted
                getattr(self, f"{prefix}_mean").copy_(x.mean(0))
            std = x.std(0) if len(x) > 1 else torch.ones_like(x[0])
            # entries that barely vary in training (e.g. a frozen A) must not amplify rounding noise later
            getattr(self, f"{prefix}_std").copy_(std.clamp_min(max(STD_FLOOR * float(std.median()), 1e-12)))

    def condition(self, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        mu_n = ((mu - self.mu_mean) / self.mu_std).clamp(-COND_CLAMP, COND_CLAMP)
        lv_n = ((torch.log(var + VAR_EPS) - self.lv_mean) / self.lv_std).clamp(-COND_CLAMP, COND_CLAMP)
        return torch.cat([self.cond_mu(mu_n), self.cond_var(lv_n)], -1)

    @staticmethod
    def _split(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, lv = h.chunk(2, -1)
        return m, lv.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)

    def target(self, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return x - mu if self.cfg.residual or self.cfg.anchor else x

    def prior_latent(self, c: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = prior mean + eps * prior std (eps = 0: the prior mean)."""
        p_m, p_lv = self._split(self.prior(c))
        return p_m + eps * (0.5 * p_lv).exp()

    def decode(self, mu: torch.Tensor, var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """LoRA vectors [S, P] for one condition (mu, var: [P]) and latent noise eps [S, Z] (differentiable)."""
        c = self.condition(mu[None], var[None]).expand(eps.shape[0], -1)
        h = torch.cat([self.prior_latent(c, eps), c], -1)
        x_n = self.decoder(h if self.cfg.conditional else torch.zeros_like(h))
        return self.untarget(x_n, mu)

    def untarget(self, x_n: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        x = x_n * self.x_std + self.x_mean
        return x + mu if self.cfg.residual or self.cfg.anchor else x

    def losses(self, x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.condition(mu, var)
        x_n = (self.target(x, mu) - self.x_mean) / self.x_std
        q_m, q_lv = self._split(self.encoder(torch.cat([x_n, c], -1)))
        p_m, p_lv = self._split(self.prior(c))
        z = q_m + torch.randn_like(q_m) * (0.5 * q_lv).exp()
        x_hat = self.decoder(torch.cat([z, c], -1))
        se = (x_hat - x_n) ** 2
        recon = se.sum(-1) if self.cfg.recon == "sum" else se.mean(-1)
        kl_dim = 0.5 * (p_lv - q_lv + (q_lv.exp() + (q_m - p_m) ** 2) / p_lv.exp() - 1)  # [B, Z]
        loss = (recon + self.cfg.kl_weight * kl_dim.sum(-1)).mean()
        return {"loss": loss, "recon": recon.mean(), "kl": kl_dim.sum(-1).mean(), "kl_per_dim": kl_dim.mean(0)}

    @torch.no_grad()
    def sample(self, mu: torch.Tensor, var: torch.Tensor, n: int, generator: torch.Generator | None = None,
               use_mean: bool = False) -> torch.Tensor:
        """n LoRA vectors for one condition (mu, var: [P]); use_mean decodes the prior mean."""
        shape = (n, self.cfg.latent)
        return self.decode(mu, var, torch.zeros(shape) if use_mean else torch.randn(shape, generator=generator))
