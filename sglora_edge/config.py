"""The configuration dataclasses: what a LoRA adapts, the recipes that train backbones, task
LoRAs and the CVAE, and where task LoRAs train (Executor). Each field carries its default and its
help, and the CLI builds its options from them (so a default is written once). Kept free of torch,
so the CLI can read them where only the device half is installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal, get_args

from .errors import SGLoRAError

TARGETS = ("q", "k", "v")
Recon = Literal["sum", "mean"]  # the CVAE's reconstruction loss over LoRA entries
Objective = Literal["recon", "retrieval"]  # what the CVAE is trained on (cvae.py, train_generator.py)
SemanticKind = Literal["backbone", "minilm"]  # what embeds task descriptions: the CLIP text tower or MiniLM
SemanticChoice = Literal["auto", SemanticKind]  # auto: measured on tiny backbones, the text tower on real ones
ExecutorKind = Literal["local", "ray"]  # where task LoRAs train


@dataclass(frozen=True)
class LoRASpec:
    """Which blocks and projections of the visual transformer a LoRA adapts, and where each A and B sits
    in the flat vector (`layout`). Recorded in every artifact; loading checks it."""
    n_blocks: int = field(metadata={"help": "blocks in the visual transformer"})
    width: int = field(metadata={"help": "transformer width d"})
    rank: int = field(default=2, metadata={"help": "LoRA rank r (paper: 2)"})
    alpha: float = field(default=2.0, metadata={"help": "scale gamma = alpha / rank"})
    targets: tuple[str, ...] = field(default=TARGETS, metadata={"help": "subset of q, k, v"})
    last_blocks: int = field(default=0, metadata={"help": "adapt only the last L blocks; 0 = every block"})
    a_seed: int = field(default=0, metadata={"help": "seed of the A matrices every task starts from"})

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or any(t not in TARGETS for t in self.targets) or list(self.targets) != sorted(
                set(self.targets), key=TARGETS.index):
            raise SGLoRAError(f"LoRA targets {self.targets} must be a non-empty subset of q, k, v in that order")
        if self.rank < 1:
            raise SGLoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.last_blocks <= self.n_blocks:
            raise SGLoRAError(f"last_blocks={self.last_blocks} must be in 0..{self.n_blocks} (0 = all blocks)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def blocks(self) -> list[int]:
        first = self.n_blocks - self.last_blocks if self.last_blocks else 0
        return list(range(first, self.n_blocks))

    @property
    def per_target(self) -> int:
        return 2 * self.rank * self.width

    @property
    def size(self) -> int:
        return len(self.blocks) * len(self.targets) * self.per_target

    def layout(self) -> list[tuple[int, str, str, int, int]]:
        """(block, target, 'A'|'B', start, stop) for every segment of the flat vector."""
        out, pos, rd = [], 0, self.rank * self.width
        for b in self.blocks:
            for t in self.targets:
                out += [(b, t, "A", pos, pos + rd), (b, t, "B", pos + rd, pos + 2 * rd)]
                pos += 2 * rd
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRASpec":
        return cls(**{**d, "targets": tuple(d["targets"])})

    @classmethod
    def for_visual(cls, visual, **kwargs) -> "LoRASpec":
        return cls(n_blocks=len(visual.transformer.resblocks), width=visual.transformer.width, **kwargs)


@dataclass(frozen=True)
class ExpertConfig:
    """The recipe of one task's LoRA (experts, train-role tasks, Oracles)."""
    epochs: int = field(default=40, metadata={"help": "training epochs per task (one pass over its train images)"})
    keep_last: int = field(default=15, metadata={"help": "keep the LoRA of each of the last M epochs (paper: 100)"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate (calibration: 5e-3 > 2e-3 > 1e-3)"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA"})
    freeze_a: bool = field(default=False, metadata={"help": "train B only against the shared seeded A"})
    seed: int = field(default=0, metadata={"help": "seed of batch order and caption draws"})

    def __post_init__(self):
        if not 1 <= self.keep_last <= self.epochs:
            raise SGLoRAError(f"keep_last={self.keep_last} must be between 1 and epochs={self.epochs}")


@dataclass(frozen=True)
class Executor:
    """Where task LoRAs train: "local" (this process, or `jobs` processes) or "ray" (one Ray task per LoRA task).

    Ray workers read the backbone and dataset from their paths, so on a cluster every node must see
    them at the same paths (a shared filesystem); only the checkpoints travel back to the driver."""
    kind: ExecutorKind = field(default="local", metadata={
        "help": "local (this machine, see --jobs) or ray (one Ray task per LoRA task; needs the 'cluster' extra)"})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join: 'auto' (the one this node belongs to) or HEAD_IP:6379; default: start a local "
                "instance. Every node must read --data and the backbone at the same paths (a shared filesystem)"})
    gpus_per_task: float | None = field(default=None, metadata={
        "help": "GPUs per Ray task (default: 1 if the cluster has GPUs, else 0; a fraction packs tasks onto a GPU)"})
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs per Ray task (also its torch thread count)"})
    max_retries: int = field(default=3, metadata={
        "help": "re-runs of a task whose worker or node died (a Python exception is not retried)"})

    def __post_init__(self):
        if self.kind not in get_args(ExecutorKind):
            raise SGLoRAError(f"--executor {self.kind!r} is unknown; choose one of {', '.join(get_args(ExecutorKind))}")
        if self.kind == "local" and self.address:
            raise SGLoRAError("--ray-address needs --executor ray")


@dataclass(frozen=True)
class PretrainConfig:
    """The recipe of a tiny CLIP pretrained from scratch on a dataset's pretrain split."""
    config: str = field(default="sglora-tiny", metadata={"help": "tiny open_clip config shipped with the package"})
    epochs: int = field(default=20, metadata={"help": "passes over the pretrain pairs"})
    batch_size: int = field(default=256, metadata={"help": "pairs per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (warm-up, then cosine decay)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and the batch order"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints"})


@dataclass(frozen=True)
class CVAEConfig:
    """The semantic CVAE's architecture, loss and training; K and tau also set how conditions aggregate."""
    latent: int = field(default=32, metadata={"help": "latent size"})
    hidden: int = field(default=256, metadata={"help": "MLP width"})
    cond_per_block: int = field(default=16, metadata={"help": "compressed condition size per LoRA block (each of mu*, log sigma*2)"})
    kl_weight: float = field(default=1.0, metadata={"help": "lambda, weight of KL(q||p)"})
    recon: Recon = field(default="sum", metadata={"help": "'sum' over entries (ELBO scale) or 'mean'"})
    residual: bool = field(default=False, metadata={"help": "decode X - mu* instead of X"})
    anchor: bool = field(default=False, metadata={"help": "decode mu* + a zero-initialised correction (starts at Top-K weighted)"})
    objective: Objective = field(default="recon", metadata={
        "help": "recon: the paper's reconstruction + KL; retrieval: contrastive loss of the decoded LoRA "
                "in the frozen backbone on seen tasks' train splits"})
    correction_penalty: float = field(default=0.0, metadata={"help": "retrieval: weight of the mean squared standardised correction"})
    recon_weight: float = field(default=0.0, metadata={"help": "retrieval: weight of the paper's loss as a regulariser"})
    steps: int = field(default=600, metadata={"help": "retrieval: optimisation steps"})
    tasks_per_step: int = field(default=4, metadata={"help": "retrieval: tasks (each with its own condition) per step"})
    images_per_task: int = field(default=48, metadata={"help": "retrieval: train images of each task per step"})
    correct_a: bool = field(default=True, metadata={"help": "anchor: False corrects only the B matrices of mu* (A stays the experts' average)"})
    conditional: bool = field(default=True, metadata={"help": "anchor: False learns one correction for every condition (the decoder sees no input)"})
    tau_jitter: float = field(default=0.0, metadata={"help": "retrieval: tau of a training condition drawn log-uniformly in tau*exp(+-jitter)"})
    k: int = field(default=4, metadata={"help": "experts in each condition (top-K)"})
    tau: float = field(default=0.1, metadata={"help": "softmax temperature over cosine similarities"})
    cond_aug: float = field(default=0.0, metadata={"help": "probability of replacing a training condition by one built from a random subset of nearby experts"})
    epochs: int = field(default=200, metadata={"help": "maximum epochs"})
    batch_size: int = field(default=64, metadata={"help": "checkpoints per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    eval_every: int = field(default=20, metadata={"help": "epochs between validation retrieval checks"})
    patience: int = field(default=3, metadata={"help": "validation checks without improvement before stopping"})
    seed: int = field(default=0, metadata={"help": "seed of init, batches, augmentation and sampling"})

    def __post_init__(self):
        if self.recon not in get_args(Recon):
            raise SGLoRAError(f"recon must be one of {', '.join(get_args(Recon))}, got {self.recon!r}")
        if self.objective not in get_args(Objective):
            raise SGLoRAError(f"objective must be one of {', '.join(get_args(Objective))}, got {self.objective!r}")
        if self.residual and self.anchor:
            raise SGLoRAError("choose one of residual and anchor decoding")

    def to_dict(self) -> dict:
        return asdict(self)


# Fixed from the validation screen over the photo domain's seen tasks (README, "Choosing the generator"):
# of penalty 0.1 / 1.0, conditional / global, A+B / B only, lr 1e-3 / 1e-4, penalty 1.0 at 100 steps scored
# best (+0.2 ± 0.4 R@1 over Top-K (ΔW)); every weaker correction scored below its own anchor.
PRODUCT_GENERATOR = CVAEConfig(anchor=True, objective="retrieval", correction_penalty=1.0, steps=100,
                               images_per_task=32, cond_aug=0.5, tau_jitter=0.5, lr=1e-3)


@dataclass
class ReproduceConfig:
    """`reproduce`: the recipes of every stage it runs (nested), and how much of the experiment to run."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig,
                                     metadata={"help": "the tiny backbone (when --backbone is not given)"})
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig, metadata={"help": "the paper's CVAE (sglora_paper)"})
    generator: CVAEConfig = field(default_factory=lambda: PRODUCT_GENERATOR,
                                  metadata={"help": "the retrieval-trained, anchored generator (sglora)"})
    multi_task: ExpertConfig = field(default_factory=lambda: ExpertConfig(epochs=10, keep_last=1),
                                     metadata={"help": "recipe of the multi-task LoRA baseline"})
    atoms: ExpertConfig = field(default_factory=lambda: ExpertConfig(epochs=10, keep_last=1, lr=1e-3), metadata={
        "help": "recipe of the routed atoms (every seen task's LoRA trained through its leave-one-out Top-K merge)"})
    atoms_drift: float = field(default=0.0, metadata={
        "help": "routed atoms: weight of the relative squared drift of an atom from its task LoRA"})
    merge_ceiling: ExpertConfig = field(default_factory=lambda: ExpertConfig(epochs=10, keep_last=1, lr=5e-2),
                                        metadata={"help": "recipe fitting the merge_ceiling oracle row's K weights"})
    lora_rank: int = field(default=LoRASpec.rank, metadata={"help": "LoRA rank r"})
    semantic: str = field(default="auto", metadata={"help": "auto, backbone or minilm"})
    samples: int = field(default=5, metadata={"help": "generated samples per task"})
    seed: int = field(default=0, metadata={"help": "seed of the data-side stages (backbone, experts)"})
    seeds: int = field(default=1, metadata={"help": "generator seeds (seed, seed+1, ...) behind every SG-LoRA row"})
    folds: int = field(default=4, metadata={"help": "cross-validation folds over the seen tasks"})
    cv_steps: tuple = field(default=(0, 100, 200), metadata={"help": "steps at which CV scores the generator"})
    ablations: bool = field(default=True, metadata={"help": "run the ablations (on the seen tasks' val split)"})
    cluster_size: int = field(default=4, metadata={
        "help": "seen tasks per description cluster of the cluster-routed library (k-means over descriptions)"})
    rotations: int = field(default=3, metadata={
        "help": "role rotations inside each (domain, family); over 3 every class of the default world is unseen once"})
    gallery_size: int = field(default=60, metadata={"help": "images per test gallery (the test split is partitioned)"})
    quick: bool = field(default=False, metadata={
        "help": "the first domain's in-dataset setting only: no cross-validation (the default generator is "
                "`default_generator`), no cross-domain or mixed settings, no transfer matrix"})
    default_generator: str = field(default="auto", metadata={
        "help": "auto (the rule: the candidate with the highest cross-validated gain over Top-K (ΔW) if it "
                "exceeds 2 SE, else the Top-K (ΔW) merge itself), retrieval, cluster, atoms, topk_dw or paper (the demo "
                "preset: what the full run's validation decided)"})
    k_values: tuple = (1, 2, 4, 8)
    tau_values: tuple = (0.02, 0.05, 0.1, 0.5)
    penalty_values: tuple = (1.0,)  # the full screen is benchmarks/generator_cv.py
    last_blocks_values: tuple = (0, 2, 1)  # 0 = every block; device task-switch cost falls with L

    @classmethod
    def preset(cls, name: str) -> "ReproduceConfig":
        if name == "default":
            return cls()
        if name == "micro":  # minutes on 2 cores: for tests and a first look
            return cls(pretrain=PretrainConfig(config="sglora-micro", epochs=15), rotations=1, gallery_size=8,
                       expert=ExpertConfig(epochs=6, keep_last=3),
                       cvae=CVAEConfig(hidden=64, epochs=20, eval_every=10, k=2),
                       generator=replace(PRODUCT_GENERATOR, hidden=64, k=2, steps=30, tasks_per_step=2, images_per_task=16),
                       multi_task=ExpertConfig(epochs=2, keep_last=1), atoms=ExpertConfig(epochs=2, keep_last=1, lr=1e-3),
                       merge_ceiling=ExpertConfig(epochs=2, keep_last=1, lr=5e-2), samples=2, folds=2, cv_steps=(0, 15, 30),
                       k_values=(1, 2), tau_values=(0.1, 0.5), penalty_values=(0.0, 1.0), last_blocks_values=(0, 1))
        if name == "demo":  # `make demo`: minutes on 2 cores, the default recipe on one domain
            # the default the full run's validation chose for these roles (rotation 0; report.json -> validation)
            return cls(quick=True, ablations=False, rotations=1, default_generator="cluster")
        raise SGLoRAError(f"--preset {name!r} is unknown; choose micro, demo or default")

    def to_dict(self) -> dict:
        return asdict(self)
