"""TCM + OPIS (paper 25): the margin regularizer and the operating-point inconsistency score against
hand-computed cases, TCM's term in the embedding module's step, OPIS's DDP merge and its refusals."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

import reglab.callbacks.metric_learning.tcm as tcm_module
import reglab.metrics.opis as opis_module
from reglab.callbacks.metric_learning import TCM
from reglab.metrics import OPIS
from reglab.metrics.opis import calibration_thresholds, opis_score
from reglab.step import StepOutput
from reglab.tasks import EmbeddingModule
from reglab.technique import TechniqueConfigError, run_stages


def at_angles(*degrees: float) -> torch.Tensor:
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def step_output(embeddings: torch.Tensor, labels: list[int]) -> StepOutput:
    return StepOutput(logits=embeddings @ embeddings.T, target=torch.tensor(labels), features=embeddings)


@pytest.mark.parametrize("module", [tcm_module, opis_module])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_tcm_by_hand_averages_each_side_over_its_hard_pairs_only():
    # class 0 at 0, 30 and 60 degrees: cosines 0.866 (0-30, 30-60), 0.5 (0-60); class 1 at 80 degrees:
    # cosines with class 0 are 0.174 (0), 0.643 (30), 0.940 (60)
    out = step_output(at_angles(0, 30, 60, 80), [0, 0, 0, 1])
    c30, c60 = math.cos(math.pi / 6), 0.5
    positive = ((0.9 - c30) * 2 + (0.9 - c60)) / 3  # every same-class pair is below m+ = 0.9
    c50, c20 = math.cos(50 * math.pi / 180), math.cos(20 * math.pi / 180)
    negative = ((c50 - 0.5) + (c20 - 0.5)) / 2  # the pairs at cos 0.643 and 0.940; the one at cos 0.174 is easy
    assert TCM().loss_terms(out, None)["tcm"].item() == pytest.approx(positive + negative, abs=1e-6)
    weighted = TCM(lambda_plus=2.0, lambda_minus=0.5).loss_terms(out, None)["tcm"].item()
    assert weighted == pytest.approx(2.0 * positive + 0.5 * negative, abs=1e-6)
    # another easy different-class pair (cos -1 with the first sample) leaves the negative side's mean as it was
    more = step_output(at_angles(0, 30, 60, 80, 180), [0, 0, 0, 1, 2])
    assert TCM(lambda_plus=0.0).loss_terms(more, None)["tcm"].item() == pytest.approx(negative, abs=1e-6)


@pytest.mark.parametrize("kwargs", [{}, dict(lambda_plus=0.3, lambda_minus=2.0, margin_plus=0.6, margin_minus=0.1)])
def test_tcm_matches_pytorch_metric_learnings_loss(kwargs):
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(6)
    embeddings = torch.randn(5, 16, generator=generator)[labels] + 0.8 * torch.randn(30, 16, generator=generator)
    ours = TCM(**kwargs).loss_terms(step_output(embeddings, labels.tolist()), None)["tcm"]
    assert ours.item() > 0
    assert ours.item() == pytest.approx(ThresholdConsistentMarginLoss(**kwargs)(embeddings, labels).item(), abs=1e-6)


def test_tcm_is_zero_without_hard_pairs_and_adds_to_the_metric_loss_in_the_step():
    easy = step_output(at_angles(0, 5, 180, 185), [0, 0, 1, 1])  # positives at cos 0.996, negatives at cos <= -0.99
    assert TCM().loss_terms(easy, None)["tcm"].item() == 0.0
    module = EmbeddingModule("mlp", input_shape=(4,), embedding_dim=3, loss="multi_similarity")
    batch = {"input": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)),
             "target": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), "index": torch.arange(8)}
    total, out, terms = run_stages(module, [TCM()], batch)
    expected = TCM().loss_terms(step_output(out.features, batch["target"].tolist()), None)["tcm"]
    assert terms["tcm/tcm"].item() == pytest.approx(expected.item()) and terms["tcm/tcm"].item() > 0
    assert total.item() == pytest.approx(terms["task_loss"].item() + expected.item())
    total.backward()
    assert module.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, problem", [({"lambda_minus": -1.0}, "non-negative"),
                                             ({"margin_plus": 0.4, "margin_minus": 0.5}, "margin_minus < margin_plus")])
def test_tcm_refuses_bad_arguments(kwargs, problem):
    with pytest.raises(TechniqueConfigError, match=problem):
        TCM(**kwargs)


def test_opis_by_hand():
    # class A at 0 and 10 degrees (cos 0.985), class B at 90 and 175 degrees (cos 0.087); the four
    # different-class cosines: -0.996, -0.966, 0 and 0.174 (A at 10 with B at 90)
    embeddings, labels = at_angles(0, 10, 90, 175), torch.tensor([0, 0, 1, 1])
    # FAR 0.5 accepts the two most similar negatives (threshold 0), FAR 0.25 the most similar one (0.174)
    negatives = torch.tensor([-0.996, -0.966, 0.0, 0.174])
    assert calibration_thresholds(negatives, (0.25, 0.5), 2).tolist() == pytest.approx([0.0, 0.174])
    # threshold 0: both classes accept their positive pair and 2 of their 4 negatives: F1 of (1, 0.5) for both.
    # threshold 0.174: TNR 3/4 for both, TPR 1 for A, 0 for B: utilities 6/7 and 0, variance (3/7)^2.
    expected = (0.0 + (3 / 7) ** 2) / 2
    assert opis_score(embeddings, labels, (0.25, 0.5), 2).item() == pytest.approx(expected, abs=1e-6)
    # B as tight as A: one threshold serves both, and the score drops to 0
    tight = at_angles(0, 10, 90, 100)
    assert opis_score(tight, labels, (0.25, 0.5), 2).item() == pytest.approx(0.0, abs=1e-12)


def test_opis_matches_a_pair_by_pair_count_with_three_uneven_classes():
    """Three classes of different sizes and spreads (each class's negatives differ): the score against
    a loop over thresholds, classes and pairs written from the definition."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    spread = torch.tensor([0.3, 1.0, 0.6])[labels, None]
    embeddings = torch.randn(3, 6, generator=generator)[labels] + spread * torch.randn(16, 6, generator=generator)
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = (unit @ unit.T).tolist()
    pairs = [(i, j) for i in range(16) for j in range(i + 1, 16)]
    negatives = sorted(similarity[i][j] for i, j in pairs if labels[i] != labels[j])
    far_low, far_high, num = 0.05, 0.4, 7
    top = negatives[len(negatives) - math.ceil(far_low * len(negatives))]
    bottom = negatives[len(negatives) - math.ceil(far_high * len(negatives))]
    variances = []
    for step in range(num):
        threshold = bottom + (top - bottom) * step / (num - 1)
        utilities = []
        for c in range(3):
            own = [similarity[i][j] for i, j in pairs if labels[i] == labels[j] == c]
            cross = [similarity[i][j] for i, j in pairs if (labels[i] == c) != (labels[j] == c)]
            tpr = sum(s >= threshold for s in own) / len(own)
            tnr = sum(s < threshold for s in cross) / len(cross)
            utilities.append(2 * tpr * tnr / (tpr + tnr) if tpr + tnr else 0.0)
        mean = sum(utilities) / 3
        variances.append(sum((u - mean) ** 2 for u in utilities) / 3)
    expected = sum(variances) / num
    assert expected > 0
    assert opis_score(embeddings, labels, (far_low, far_high), num).item() == pytest.approx(expected, abs=1e-5)


def test_opis_merged_shards_count_a_padded_repeat_once():
    """Two ranks' states as DDP's gather hands them over, the second padded with a repeat of the
    first sample: the single-process score (a repeat would add a same-class pair at cosine 1)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(6)
    embeddings = torch.randn(4, 8, generator=generator)[labels] + torch.randn(24, 8, generator=generator)
    embeddings[labels == 3] *= 0.0  # one class spread far wider than the others: a clearly nonzero score
    embeddings[labels == 3] += torch.randn(6, 8, generator=generator)
    index = torch.arange(24)
    whole, rank0, rank1 = OPIS(), OPIS(), OPIS()
    whole.update(embeddings, labels, index)
    rank0.update(embeddings[:12], labels[:12], index[:12])
    padded = torch.cat([index[12:], index[:1]])
    rank1.update(embeddings[padded], labels[padded], padded)
    rank0.merge_state(rank1)
    assert whole.compute().item() > 0
    assert rank0.compute().item() == pytest.approx(whole.compute().item(), abs=1e-7)
    repeated = torch.cat([index, index[:1]])
    assert opis_score(embeddings[repeated], labels[repeated]).item() != pytest.approx(whole.compute().item())


def test_opis_refuses_bad_arguments_and_a_split_without_pairs():
    with pytest.raises(ValueError, match="far_range"):
        OPIS(far_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="num_thresholds"):
        OPIS(num_thresholds=1)
    with pytest.raises(ValueError, match="two classes"):
        opis_score(at_angles(0, 10, 20), torch.tensor([0, 1, 2]))
