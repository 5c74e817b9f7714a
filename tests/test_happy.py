"""Happy (paper 02): its maths against hand-computed cases, the continual discovery stages, the runner's
Hungarian hook, and a short stage sequence with exact state round-trip."""

import math

import pytest
import torch

from reglab.callbacks.category_discovery.happy import (Happy, class_radius, entropy_gap, hardness_probabilities,
                                                       mean_similarity, soft_entropy)
from reglab.continual import TaskSequenceRunner
from reglab.continual.runner import aligned
from reglab.datamodules import ContinualDiscoveryDataModule, DiscoveryDataModule
from reglab.metrics import align_clusters
from reglab.tasks import ContinualDiscoveryModule
from reglab.technique import TechniqueConfigError


def test_soft_entropy_by_hand():
    # mean prediction [0.6, 0.2, 0.1, 0.1] with 2 old classes: p_o = 0.8, p_n = 0.2
    logits = torch.tensor([[0.6, 0.2, 0.1, 0.1]]).log()
    old_new = 0.8 * math.log(0.8) + 0.2 * math.log(0.2) + math.log(2)
    old = 0.75 * math.log(0.75) + 0.25 * math.log(0.25) + math.log(2)
    new = 0.0  # [0.5, 0.5] inside the new classes
    assert float(soft_entropy(logits, 2)) == pytest.approx(2 * old_new + old + new, abs=1e-5)
    assert float(soft_entropy(logits, 2, old_new_weight=0.0, old_weight=0.0)) == pytest.approx(0.0, abs=1e-6)
    # one new class: no intra-new term (the code's `num_novel_class_per_session > 1`)
    three = torch.tensor([[0.5, 0.3, 0.2]]).log()
    expected = 2 * (0.8 * math.log(0.8) + 0.2 * math.log(0.2) + math.log(2)) + (
        0.625 * math.log(0.625) + 0.375 * math.log(0.375) + math.log(2))
    assert float(soft_entropy(three, 2)) == pytest.approx(expected, abs=1e-5)


def test_soft_entropy_asks_half_the_mass_for_the_new_classes():
    # 8 old and 2 new classes, uniform over all: the flat gap is 0, the group-wise one is not
    uniform = torch.zeros(1, 10)
    assert float(entropy_gap(torch.softmax(uniform, -1)[0])) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_entropy(uniform, 8)) > 0.1
    half = torch.tensor([[1 / 16] * 8 + [1 / 4] * 2]).log()
    assert float(soft_entropy(half, 8)) == pytest.approx(0.0, abs=1e-5)


def test_hardness_radius_by_hand():
    prototypes = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    similarity = mean_similarity(prototypes)
    assert similarity.tolist() == pytest.approx([0.3, 0.7, 0.4])
    probabilities = hardness_probabilities(similarity, 0.1)
    expected = torch.tensor([3.0, 7.0, 4.0]).exp()
    assert probabilities.tolist() == pytest.approx((expected / expected.sum()).tolist())
    feats = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 0.0], [0.0, 2.0]])  # class variances: 1 and 1 (trace), D = 2
    assert float(class_radius(feats, torch.tensor([0, 0, 1, 1]), 2)) == pytest.approx(math.sqrt(0.5))


def test_align_clusters_and_runner_grouping():
    assert align_clusters(torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 2]), 3, 3).tolist() == [0, 0, 1, 2]
    # two tasks scored among the same classes share one map; a third with other candidates gets its own
    predicted = [torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([0])]
    targets = [torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2])]
    masks = [torch.tensor([True, True, False]), torch.tensor([True, True, False]), torch.tensor([True, True, True])]
    result = aligned(lambda p, t: align_clusters(p, t, 3, 3), predicted, targets, masks)
    assert [r.tolist() for r in result] == [[0, 0], [1, 1], [2]]


def stages(seed=0):
    base = DiscoveryDataModule("blobs", known_classes=[0, 1], labelled_fraction=0.8, batch_size=32, seed=seed,
                               generated_classes=6, generated_samples=360, cluster_std=1.0)
    return ContinualDiscoveryDataModule(base, num_stages=2)


def test_stages_hold_old_and_new_classes_without_labels():
    data = stages()
    data.setup("fit")
    assert data.tasks == [[0, 1], [2, 3], [4, 5]]
    stage_of = data.stage_of
    extras = data.base.train_dataset.extras
    assert bool((stage_of[extras["labelled"]] == 0).all()) and bool((stage_of[~extras["labelled"]] >= 1).all())
    for task, classes in ((1, {0, 1, 2, 3}), (2, {0, 1, 2, 3, 4, 5})):
        data.set_task(task)
        true = {int(data.train_dataset[i]["true_target"]) for i in range(len(data.train_dataset))}
        assert true == classes  # old classes (and earlier new ones) come back unlabelled
        assert not any(bool(data.train_dataset[i]["labelled"]) for i in range(len(data.train_dataset)))
    test = data.task_split("test", 2)
    assert {int(test[i]["target"]) for i in range(len(test))} == {4, 5}  # true classes, for the runner
    with pytest.raises(ValueError, match="do not split evenly"):
        ContinualDiscoveryDataModule(stages().base, num_stages=3)


def test_happy_runs_the_stages_and_keeps_its_state(tmp_path):
    data = stages()
    torch.manual_seed(0)
    module = ContinualDiscoveryModule("mlp", input_shape=data.input_shape, num_classes=6, num_known_classes=2,
                                      backbone_kwargs={"hidden_sizes": [32]})
    happy = Happy(kmeans_init=2)
    trainer = {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
               "accelerator": "cpu"}
    runner = TaskSequenceRunner(module, data, [happy], trainer, run_dir=tmp_path, log=False)
    matrix = runner.run()
    seen = torch.ones(3, 3, dtype=torch.bool).tril()  # row t: the stages seen after stage t
    assert matrix.shape == (3, 3) and bool(((matrix[seen] >= 0) & (matrix[seen] <= 1)).all())
    assert happy.prototypes.shape == (6, 32) and happy.teacher_state is not None and happy.started_task == 2
    assert torch.allclose(happy.prototypes.norm(dim=-1), torch.ones(6))
    restored = Happy()
    restored.load_state_dict(happy.state_dict())
    for key, value in happy.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, restored.state_dict()[key])
    assert restored.state_dict()["teacher"].keys() == happy.state_dict()["teacher"].keys()


def test_clustering_guided_init_puts_new_heads_on_far_centroids():
    data = stages()
    data.setup("fit")
    data.set_task(1)
    torch.manual_seed(0)
    module = ContinualDiscoveryModule("mlp", input_shape=data.input_shape, num_classes=6, num_known_classes=2)
    module.active_classes[4:] = False
    happy = Happy(kmeans_init=2)
    happy.prototypes = torch.nn.functional.normalize(torch.randn(2, module.backbone.feature_dim), dim=-1)
    before = module.classifier.weight.detach().clone()
    happy._initialize_new_heads(module, data.train_dataset)
    after = module.classifier.weight.detach()
    assert torch.equal(before[:2], after[:2]) and torch.equal(before[4:], after[4:])  # old and later rows kept
    assert not torch.allclose(before[2:4], after[2:4])


def test_bad_settings_fail_early():
    with pytest.raises(TechniqueConfigError, match="hardness_temperature"):
        Happy(hardness_temperature=0.0)
    with pytest.raises(TechniqueConfigError, match="negative"):
        Happy(prototype_weight=-1.0)
