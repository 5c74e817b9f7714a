"""Kernel continual learning (Derakhshani et al., ICML 2021): a task-specific kernel ridge
regression classifier on a shared feature extractor, fitted on a per-task coreset.

For task t a class-balanced coreset ``C_t`` of ``core_size`` training samples is set aside (it is
not trained on, as the official ``coreset_selection``). With ``h`` the backbone, a query ``x`` of
task t is classified among the task's classes by kernel ridge regression on the coreset:

    alpha_t  = (K(h(C_t), h(C_t)) + ridge I)^-1 Y_t          (Y_t: one-hot over the task's classes)
    scores   = scale * K(h(x), h(C_t)) alpha_t

and the loss is cross-entropy of these scores, back-propagated through the query's and the
coreset's features. At evaluation the classifier of every task is rebuilt the same way from that
task's stored coreset through the *current* backbone, so nothing of the classifier is stored but
the coreset: the memory is the coreset (inputs and labels, counted in bytes by the runner's
``stored_bytes``). The scores replace the head's output (a forward hook on ``module.head``; the
head is frozen, it takes no part), in the columns of each task's classes, so the runner's
task-incremental rule (logits masked to the task's classes) is exactly the paper's task-aware
inference. The class-incremental row the runner reports beside it compares uncalibrated scores of
different tasks' classifiers and is not a setting of the paper.

Kernels (``kernel``): ``linear`` ``K(a, b) = a.b``; ``rbf`` ``exp(-|a - b|^2 / (2 s^2))``;
``rff`` random Fourier features (Rahimi & Recht) ``phi(a) = sqrt(2/D) cos(W a / s + b)``,
``W ~ N(0, I)``, ``b ~ U[0, 2 pi)``, ``K = phi(a).phi(b)``, which approximates ``rbf``. The bandwidth
``s`` is the median pairwise distance of the support features (the median heuristic) unless given.

Against the official code (github.com/mmderakhshani/KCL, ``stable_sgd/main.py``, ``main_rbf.py``),
which this follows where it can (coreset set aside from the task's training data, closed-form
ridge solution recomputed every step, ``ridge`` 0.1 as the code's ``lmd`` initialisation, ``rff``
the default kernel, 1024 random features as the run scripts):

* the paper's *variational* random features (the bases sampled from a posterior that an inference
  network amortises on the coreset, with a KL term to a prior on the batch) are replaced by fixed
  random bases: the variational part is a refinement of the kernel, the claim here is about the
  memory;
* the code learns the ridge, a scale and a bias per task by SGD; here ``ridge`` and ``scale`` are
  fixed hyperparameters (no parameters are added to the model, so checkpoints keep their shapes);
* the code's evaluation of an old task passes the *current* task's id to the classifier (its
  learnt ridge / scale) — the paper's intent, followed here, is each task's own classifier;
* the code's ``rbf`` is ``exp(-0.25 |a - b|_1)`` (a Laplacian kernel); ``rbf`` here is the Gaussian
  kernel that ``rff`` approximates.

Outside a task sequence (``reglab fit`` on a plain DataModule) the whole training set is one task.
State (in checkpoints): which task each class belongs to and the coresets; the coreset draw is
seeded by ``(seed, task)`` from the whole task's training set, so every DDP rank holds the same one.

Method card (what it does, when it helps, what it costs): ``kernel_continual_learning.card.yaml``.

Example:
    >>> from reglab.callbacks import KernelContinualLearning
    >>> kcl = KernelContinualLearning(core_size=40, kernel="linear")  # reglab fit-tasks, scenario task
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from reglab.anchors import flatten_state, unflatten_state
from reglab.checkpoints import add_restore_hook
from reglab.technique import Technique

KERNELS = ("linear", "rbf", "rff")
CLASSIFIER_ATTR = "_reglab_kernel_classifier"  # the module's attached classifier (a plain attribute)
STATE_KEY = "reglab_kernel_classifier"  # the classifier's class and arguments, in the checkpoint, for the restore hook


# -- the maths: small pure functions ----------------------------------------------------------------
def linear_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``K[i, j] = a_i . b_j``.

    Example:
        >>> linear_kernel(torch.tensor([[1., 2.]]), torch.tensor([[3., 4.], [0., 1.]]))
        tensor([[11.,  2.]])
    """
    return a @ b.T


def rbf_kernel(a: Tensor, b: Tensor, bandwidth: float | Tensor) -> Tensor:
    """``K[i, j] = exp(-|a_i - b_j|^2 / (2 s^2))``."""
    return torch.exp(-torch.cdist(a, b).square() / (2 * bandwidth**2))


def random_fourier_features(x: Tensor, bases: Tensor, bias: Tensor, bandwidth: float | Tensor) -> Tensor:
    """``phi(x) = sqrt(2 / D) cos(x W^T / s + b)`` for ``D`` bases ``W`` (D, d) and phases ``b`` (D,):
    ``phi(a).phi(b)`` estimates ``exp(-|a - b|^2 / (2 s^2))`` when ``W ~ N(0, I)``, ``b ~ U[0, 2 pi)``."""
    return math.sqrt(2.0 / len(bases)) * torch.cos(x @ bases.T / bandwidth + bias)


def median_bandwidth(x: Tensor) -> Tensor:
    """The median of the pairwise distances between distinct rows of ``x`` (at least 1e-6).

    Example:
        >>> median_bandwidth(torch.tensor([[0., 0.], [3., 4.], [0., 1.]]))   # distances 5, 1, sqrt(18)
        tensor(4.2426)
    """
    rows = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    distances = torch.cdist(x, x)[rows[0], rows[1]]
    return distances.median().clamp_min(1e-6)


def kernel_ridge_predict(support_kernel: Tensor, cross_kernel: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """Kernel ridge regression: ``K_qs (K_ss + ridge I)^-1 Y`` for the support's kernel ``K_ss``
    (n, n), the queries' kernel against the support ``K_qs`` (m, n) and the targets ``Y`` (n, c).

    Example:
        >>> kernel_ridge_predict(2 * torch.eye(2), torch.ones(1, 2), torch.eye(2), ridge=1.0)  # (2I + I)^-1 = I/3
        tensor([[0.3333, 0.3333]])
    """
    regularized = support_kernel + ridge * torch.eye(len(support_kernel), dtype=support_kernel.dtype, device=support_kernel.device)
    return cross_kernel @ torch.linalg.solve(regularized, targets)


def one_hot_among(targets: Tensor, classes: Tensor) -> Tensor:
    """``Y[i, j] = (targets_i == classes_j)`` as floats: one-hot over a task's own classes.

    Example:
        >>> one_hot_among(torch.tensor([7, 3, 7]), torch.tensor([3, 7]))
        tensor([[0., 1.],
                [1., 0.],
                [0., 1.]])
    """
    return (targets[:, None] == classes[None, :]).float()


def balanced_draw(targets: Tensor, classes: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Positions of ``per_class`` rows of each of ``classes`` in ``targets`` (all of a class's rows
    when it has fewer), drawn without replacement; sorted."""
    chosen = []
    for cls in classes.tolist():
        rows = (targets == cls).nonzero().flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def task_training_data(datamodule: Any) -> dict[str, Tensor]:
    """Every training sample of the DataModule's current task (its whole training set, not a
    rank's shard), stacked: ``input``, ``target``, ``index``."""
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        raise ValueError("the DataModule has no train_dataset")
    items = [dataset[i] for i in range(len(dataset))]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in ("input", "target", "index")}


def seeded(*numbers: int) -> torch.Generator:
    # Only integers: their hash does not depend on PYTHONHASHSEED.
    return torch.Generator().manual_seed(hash(numbers) & (2**63 - 1))


class KernelContinualLearning(Technique):
    """A per-task kernel ridge regression classifier on the backbone's features, fitted on a stored
    coreset of each task (see the module docstring).

    Args:
        core_size: coreset samples kept per task, split evenly over the task's classes (rounded down,
            at least one per class).
        kernel: ``linear``, ``rbf`` or ``rff``.
        ridge: the ridge of the closed-form solution.
        scale: the scores' factor before the softmax (the code's per-task ``gamma``, at its initial value).
        num_random_features: ``D`` of ``rff``.
        bandwidth: ``s`` of ``rbf`` / ``rff``; ``None``: the median heuristic on the support features.
        seed: seed of the coreset draw and the random bases.
    """

    name = "kernel_continual_learning"

    needs = frozenset({"index"})
    stateful = True
    conflicts_with = ("KernelContinualLearning", "GenerativeKernelCL")  # one classifier replaces the head
    fsdp_unsupported = "its classifier calls the backbone on the support set inside the head's forward hook"

    def __init__(self, core_size: int = 20, kernel: str = "rff", ridge: float = 0.1, scale: float = 1.0,
                 num_random_features: int = 1024, bandwidth: float | None = None, seed: int = 0) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"{type(self).__name__}: kernel must be one of {list(KERNELS)}, got {kernel!r}")
        if core_size < 1 or ridge <= 0 or scale <= 0 or num_random_features < 1 or (bandwidth is not None and bandwidth <= 0):
            raise ValueError(f"{type(self).__name__}: core_size and num_random_features must be at least 1 and "
                             f"ridge, scale and bandwidth positive; got {core_size}, {num_random_features}, {ridge}, "
                             f"{scale}, {bandwidth}")
        self.core_size, self.kernel, self.ridge, self.scale = core_size, kernel, ridge, scale
        self.num_random_features, self.bandwidth, self.seed = num_random_features, bandwidth, seed
        self.arguments = {"core_size": core_size, "kernel": kernel, "ridge": ridge, "scale": scale,
                          "num_random_features": num_random_features, "bandwidth": bandwidth, "seed": seed}
        # (num_classes,) 1 + the task of each class, 0 before it (a tensor of state the harness sees updated)
        self.class_task: Tensor | None = None
        self.coresets: dict[str, Tensor] = {}  # "<task>.input", "<task>.target"
        # the current task's coreset positions (not trained on); dropped at the task's end, not memory
        self.set_aside = torch.empty(0, dtype=torch.long)
        self.task = 0
        self._hooked: Any = None  # the module whose head this classifier scores
        self._handle: Any = None
        self._bases: tuple[Tensor, Tensor] | None = None

    # -- memory of a task (the generative variant overrides these two) ------------------------------
    def remember_task(self, data: dict[str, Tensor], classes: Tensor, task: int) -> None:
        """Set task ``task``'s memory from its training samples ``data``: here, the coreset."""
        per_class = max(1, self.core_size // len(classes))
        kept = balanced_draw(data["target"], classes, per_class, seeded(self.seed, task))
        self.coresets[f"{task}.input"] = data["input"][kept].float()
        self.coresets[f"{task}.target"] = data["target"][kept].long()
        self.set_aside = data["index"][kept].long()

    def support(self, task: int, module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The support set (inputs, targets) that task ``task``'s classifier is fitted on."""
        return self.coresets[f"{task}.input"], self.coresets[f"{task}.target"]

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        head, backbone = getattr(pl_module, "head", None), getattr(pl_module, "backbone", None)
        if not isinstance(head, torch.nn.Module) or not isinstance(backbone, torch.nn.Module) \
                or getattr(pl_module, "active_classes", None) is None:
            raise self.fail(f"{type(pl_module).__name__} has no `backbone` and `head` modules with `active_classes`, "
                            "so there is no head whose output the kernel classifier can replace",
                            "use a ClassificationModule whose backbone has a separate head (not an `hf:` model)")
        if getattr(trainer.datamodule, "scenario", "task") == "class":
            raise self.fail("it classifies each task with that task's own kernel classifier (task-aware, as the "
                            "paper), which a class-incremental scenario does not allow",
                            "use TaskSequenceDataModule(scenario='task')")
        # the head's weights take no part: frozen before DDP wraps the module (no unused-parameter wait)
        head.requires_grad_(False)
        self.attach(pl_module)

    def attach(self, module: L.LightningModule, replace: bool = True) -> None:
        """Make ``module.head``'s output this classifier's scores; a classifier attached before (the
        one a checkpoint's restore hook rebuilt) is detached, unless ``replace`` is off."""
        previous = getattr(module, CLASSIFIER_ATTR, None)
        if previous is self or (previous is not None and not replace):
            return
        if previous is not None:
            previous._handle.remove()
        self._handle = module.head.register_forward_hook(self._kernel_scores_hook)
        self._hooked = module
        setattr(module, CLASSIFIER_ATTR, self)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a resume's state restore: a task whose memory came back from the checkpoint is not redrawn
        data = trainer.datamodule
        self.task = int(getattr(data, "task", 0))
        num_classes = pl_module.active_classes.numel()
        if self.class_task is None:
            self.class_task = torch.zeros(num_classes, dtype=torch.long)
        tasks = getattr(data, "tasks", None)
        classes = torch.tensor(tasks[self.task] if tasks is not None else range(num_classes), dtype=torch.long)
        if (self.class_task[classes] == self.task + 1).all():
            return
        if getattr(data, "train_dataset", None) is None:
            raise self.fail("it draws each task's memory from the whole training set of the task, but the trainer "
                            "has no DataModule with a `train_dataset`", "fit with a DataModule (datamodule=...)")
        self.class_task[classes] = self.task + 1
        self.remember_task(task_training_data(data), classes, self.task)

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        self.set_aside = torch.empty(0, dtype=torch.long)

    # -- training ------------------------------------------------------------------------------------
    def transform_batch(self, batch: dict[str, Any], module: L.LightningModule) -> dict[str, Any]:
        """The current task's coreset is set aside: its samples are not trained on."""
        if not len(self.set_aside) or "index" not in batch:
            return batch
        keep = ~torch.isin(batch["index"], self.set_aside.to(batch["index"].device))
        if keep.all() or not keep.any():  # a batch made only of coreset samples is kept whole
            return batch
        size = len(keep)
        return {k: v[keep] if isinstance(v, Tensor) and v.shape[:1] == (size,) else v for k, v in batch.items()}

    # -- the classifier ------------------------------------------------------------------------------
    def _kernel_scores_hook(self, head: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook of the module's head: its output becomes each task's kernel ridge scores, in
        that task's classes' columns (training: the current task only; evaluation: every task seen)."""
        module, features = self._hooked, args[0]
        scores = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
        if self.class_task is None:
            return scores.to(output.dtype)
        tasks = [self.task] if module.training else sorted({t - 1 for t in self.class_task.tolist() if t > 0})
        for task in tasks:
            classes = (self.class_task == task + 1).nonzero().flatten()
            inputs, targets = self.support(task, module)
            support_features = module.backbone(inputs.to(features.device, features.dtype))
            columns = self.task_scores(features, support_features, one_hot_among(targets.to(features.device), classes.to(features.device)))
            scores[:, classes.to(output.device)] = columns
        return scores.to(output.dtype)

    def task_scores(self, features: Tensor, support_features: Tensor, targets: Tensor) -> Tensor:
        """``scale`` times the kernel ridge prediction of ``features`` from the support (in fp32)."""
        with torch.autocast(features.device.type, enabled=False):  # a solve in bf16 loses the classifier
            return self.scale * self._kernel_ridge(features.float(), support_features.float(), targets)

    def _kernel_ridge(self, query: Tensor, support: Tensor, targets: Tensor) -> Tensor:
        if self.kernel == "linear":
            support_kernel, cross_kernel = linear_kernel(support, support), linear_kernel(query, support)
        else:
            bandwidth = self.bandwidth or median_bandwidth(support.detach())
            if self.kernel == "rbf":
                support_kernel, cross_kernel = rbf_kernel(support, support, bandwidth), rbf_kernel(query, support, bandwidth)
            else:
                bases, bias = self._random_bases(support.shape[1], support.device)
                phi_s = random_fourier_features(support, bases, bias, bandwidth)
                phi_q = random_fourier_features(query, bases, bias, bandwidth)
                support_kernel, cross_kernel = linear_kernel(phi_s, phi_s), linear_kernel(phi_q, phi_s)
        return kernel_ridge_predict(support_kernel, cross_kernel, targets, self.ridge)

    def _random_bases(self, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The ``rff`` bases and phases: drawn from ``seed`` once (not state: they are redrawn alike)."""
        if self._bases is None or self._bases[0].shape[1] != dim:
            generator = seeded(self.seed, -1)
            self._bases = (torch.randn(self.num_random_features, dim, generator=generator),
                           torch.rand(self.num_random_features, generator=generator) * 2 * math.pi)
        return self._bases[0].to(device), self._bases[1].to(device)

    # -- state ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {"class_path": f"{type(self).__module__}:{type(self).__qualname__}",
                                 "init_args": dict(self.arguments), "state_key": self.state_key}
        add_restore_hook(checkpoint, "reglab.callbacks.continual.kernel_continual_learning:restore_classifier")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"task": self.task, "set_aside": self.set_aside.clone(),
                                 **flatten_state("coreset", self.coresets)}
        if self.class_task is not None:
            state["class_task"] = self.class_task.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task = int(state_dict["task"])
        self.set_aside = state_dict["set_aside"].clone()
        self.class_task = state_dict["class_task"].clone() if "class_task" in state_dict else None
        self.coresets = unflatten_state("coreset", state_dict)


def restore_classifier(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Restore hook: a module loaded from a checkpoint (``load_from_checkpoint``, a task runner resumed
    at a boundary) gets the checkpoint's kernel classifier back, with its memory; a classifier already
    attached (a fit resumed with ``ckpt_path``, whose technique is live) is left in place."""
    spec = checkpoint[STATE_KEY]
    module_name, _, class_name = spec["class_path"].partition(":")
    classifier = getattr(importlib.import_module(module_name), class_name)(**spec["init_args"])
    classifier.load_state_dict(checkpoint["callbacks"][spec["state_key"]])
    classifier.attach(module, replace=False)
