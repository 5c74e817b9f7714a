"""TENT: fully test-time adaptation by entropy minimization (Wang et al., ICLR 2021).

While the model evaluates, each test batch is normalised with its own batch-norm statistics and
the batch norms' affine scale and shift take one gradient step on the mean prediction entropy

    H(x) = -sum_c p_c(x) log p_c(x),   p = softmax(logits),

whose gradient with respect to the logits is ``dH/dz_k = -p_k (log p_k + H)``.

Source: the official code (github.com/DequanWang/tent, ``tent.py`` and ``conf.py``), whose defaults
this follows: the parameters are the batch-norm affine parameters only, every batch norm uses test
batch statistics (``track_running_stats`` off), Adam with lr 1e-3, betas (0.9, 0.999), no weight
decay (SGD with Nesterov momentum 0.9 as the alternative), one step per batch, and the prediction is
the output of the forward pass the step was taken on. The official ``collect_params`` takes
``BatchNorm2d`` layers only; this takes every batch-norm layer (1-d too), so an MLP with
``norm: batch`` adapts as well. The official model adapts online across all batches of a corruption
and is reset between corruptions by the evaluation script; here every ``validate`` / ``test`` /
``predict`` run is one such episode (``episodic=True`` resets per batch, the official
``MODEL.EPISODIC``). The mechanism (gradients in the evaluation loop, restoring the model after
the run) is the core's :class:`reglab.technique.EvalTimeAdaptation`.
"""

from __future__ import annotations

import lightning as L
from torch import Tensor

from reglab.step import StepOutput
from reglab.technique import EvalTimeAdaptation


def softmax_entropy(logits: Tensor) -> Tensor:
    """``(N,)`` entropy of ``softmax(logits)`` over the last dim, in fp32."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


class TENT(EvalTimeAdaptation):
    """Test-time entropy minimization on the batch norms' affine parameters.

    Training is untouched: attach TENT to the trainer that tests (with ``reglab``, add
    ``--config configs/technique/tent.yaml`` to a ``test`` command, or to ``fit`` with
    ``--test_after_fit true``). A test run leaves the model as it was unless ``keep_adapted``.

    Args: those of :class:`reglab.technique.EvalTimeAdaptation`, whose defaults are the official
    TENT's (``batch_statistics=False`` is the paper's ablation without test-batch normalization).

    Example:
        >>> import torch
        >>> from reglab.registry import example_data, example_trainer
        >>> from reglab.tasks import ClassificationModule
        >>> module = ClassificationModule("mlp", num_classes=10, input_shape=(64,),
        ...                               backbone_kwargs={"hidden_sizes": (32,), "norm": "batch"})
        >>> before = {k: v.clone() for k, v in module.state_dict().items()}
        >>> _ = example_trainer(callbacks=[TENT()]).test(module, datamodule=example_data(), verbose=False)
        >>> all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
        True
    """

    name = "tent"

    def adaptation_loss(self, out: StepOutput, module: L.LightningModule) -> Tensor:
        return softmax_entropy(out.logits).mean()
