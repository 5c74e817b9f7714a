"""Category discovery: the Hungarian clustering accuracy by hand, the NCD / GCD split, SimGCD's loss
terms by hand, a fit that logs all / old / new, and exact resume with views drawn per batch."""

from __future__ import annotations

import doctest
import importlib
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from reglab.bench.protocols import ClaimError
from reglab.callbacks.baselines import SAM
from reglab.datamodules import DiscoveryDataModule
from reglab.discovery.protocols import DiscoveryProtocol
from reglab.metrics import ClusteringAccuracy
from reglab.tasks import DiscoveryModule
from reglab.tasks.discovery import mean_entropy_gap, self_distillation, supervised_contrastive


def accuracy(preds, target, num_classes=3, old=2, **kwargs):
    metric = ClusteringAccuracy(num_classes, old, **kwargs)
    metric.update(torch.tensor(preds), torch.tensor(target))
    return {name: float(value) for name, value in metric.compute().items()}


def test_a_permuted_labelling_scores_one():
    target = [0, 0, 1, 1, 2, 2, 2]
    assert accuracy([2, 2, 0, 0, 1, 1, 1], target) == {"all": 1.0, "old": 1.0, "new": 1.0}


def test_a_known_confusion_gives_the_hand_value():
    """Counts (cluster x class): c0 = [1, 0, 2], c1 = [2, 0, 1], c2 = [0, 2, 0]. The best one-to-one
    map is c1->0, c2->1, c0->2 (6 of 8; the identity gets 1 + 0 + 0); old classes 0, 1: 2/3 + 2/2
    -> 4/5; new class 2: 2/3. Scoring old and new by separate assignments (GCD's v1) would give old
    c1->0, c2->1 and new c0->2 too here, so the next case tells the variants apart."""
    result = accuracy([1, 1, 0, 2, 2, 0, 0, 1], [0, 0, 0, 1, 1, 2, 2, 2])
    assert result == pytest.approx({"all": 6 / 8, "old": 4 / 5, "new": 2 / 3})


def test_one_assignment_over_all_classes_not_one_per_group():
    """Cluster 0 holds 3 of class 0 (old) and 2 of class 1 (new); cluster 1 holds 1 of class 1.
    One assignment (v2): c0->0, c1->1: old 3/3, new 1/3. Separate assignments would give the new
    class cluster 0 as well (new 2/3)."""
    result = accuracy([0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1], num_classes=2, old=1)
    assert result == pytest.approx({"all": 4 / 6, "old": 1.0, "new": 1 / 3})


def test_extra_clusters_count_as_wrong_and_an_empty_group_is_nan():
    result = accuracy([0, 1, 2], [0, 1, 1], num_classes=2, old=[0, 1], num_clusters=3)
    assert result["all"] == pytest.approx(2 / 3) and result["old"] == pytest.approx(2 / 3)
    assert math.isnan(result["new"])


def test_two_processes_merged_equal_one_process():
    """Each shard alone prefers another map (shard 1: c0->0; shard 2: c0->1), so summing per-shard
    matches (the official code's DDP) gives 6 of 6; the summed contingency gives the one-process 3 of 6."""
    preds, target = torch.tensor([0, 0, 1, 0, 0, 1]), torch.tensor([0, 0, 1, 1, 1, 0])
    whole = ClusteringAccuracy(2, 1)
    whole.update(preds, target)
    shards = [ClusteringAccuracy(2, 1) for _ in range(2)]
    shards[0].update(preds[:3], target[:3])
    shards[1].update(preds[3:], target[3:])
    per_shard = sum(float(s.clone().compute()["all"]) * 3 for s in shards) / 6
    shards[0].merge_state(shards[1])
    merged, single = shards[0].compute(), whole.compute()
    assert {k: float(v) for k, v in merged.items()} == {k: float(v) for k, v in single.items()}
    assert float(single["all"]) == pytest.approx(3 / 6) and per_shard == pytest.approx(1.0)


def test_update_leaves_the_tensor_a_spawned_process_received_alone():
    """ddp_spawn hands every process the state in shared memory: an in-place add would sum all
    ranks' counts (and the parent's) into one tensor, so each rank's sum would count them twice."""
    metric = ClusteringAccuracy(2, 1)
    received = metric.contingency.share_memory_()
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert int(received.sum()) == 0 and int(metric.contingency.sum()) == 2


def test_bad_metric_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="not the -1 of unlabelled"):
        accuracy([0, 1], [0, -1])
    with pytest.raises(ValueError, match="old classes"):
        ClusteringAccuracy(3, [1, 3])


def split_of(data):
    data.setup("fit")
    train, pool = data.train_dataset, data.pool_dataset
    return train, pool, train.extras["labelled"]


def test_gcd_pool_mixes_known_and_novel_and_labels_only_known():
    data = DiscoveryDataModule("digits", known_classes=[7, 2], novel_classes=[0, 5, 9], labelled_fraction=0.25)
    assert data.classes == [7, 2, 0, 5, 9] and data.num_known_classes == 2
    train, pool, labelled = split_of(data)
    assert (train.extras["true_target"][labelled] < 2).all() and (train.targets[~labelled] == -1).all()
    assert torch.equal(train.targets[labelled], train.extras["true_target"][labelled])
    pool_classes = set(pool.extras["true_target"].tolist())
    assert pool_classes == {0, 1, 2, 3, 4}
    for cls in (0, 1):  # a quarter of each known class's training samples is labelled
        members = train.extras["true_target"] == cls
        assert (labelled & members).sum() == round(0.25 * members.sum().item())
    assert len(train) == len(pool) + labelled.sum()
    # evaluation: the pool first, then the held-out split; novel classes' targets hidden
    val = data.val_dataset
    assert val.extras["pool"][: len(pool)].all() and not val.extras["pool"][len(pool):].any()
    assert (val.targets[val.extras["true_target"] >= 2] == -1).all()


def test_ncd_pool_holds_novel_classes_only():
    train, pool, labelled = split_of(DiscoveryDataModule("wine", known_classes=[0], mode="ncd"))
    assert (pool.extras["true_target"] >= 1).all() and labelled.sum() == (train.extras["true_target"] == 0).sum()


@pytest.mark.parametrize("kwargs, message", [
    ({"known_classes": [0, 1], "novel_classes": [1, 2]}, "both known and novel"),
    ({"known_classes": []}, "known_classes is empty"),
    ({"known_classes": [0, 12]}, "outside 0..9"),
    ({"mode": "osr"}, "mode 'osr'"),
    ({"labelled_fraction": 1.0}, "below 1 for GCD"),
    ({"source": "mnist"}, "unknown source"),
])
def test_bad_split_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiscoveryDataModule(**kwargs)


def test_a_fraction_that_labels_nothing_is_refused_at_setup():
    with pytest.raises(ValueError, match="labels 0 of them"):
        DiscoveryDataModule("iris", known_classes=[0], labelled_fraction=0.001).setup("fit")


def test_views_depend_on_the_batch_number_only_and_batches_are_balanced():
    images = DiscoveryDataModule("digits")
    tabular = DiscoveryDataModule("blobs", tabular_noise=0.5)
    assert tabular.input_shape == (8,) and tabular.num_classes == 6
    for data, inputs in ((images, torch.rand(4, 1, 8, 8)), (tabular, torch.randn(4, 8))):
        first, again, other = data.make_views(inputs, 3), data.make_views(inputs, 3), data.make_views(inputs, 4)
        assert torch.equal(first["view1"], again["view1"]) and not torch.equal(first["view1"], first["view2"])
        assert not torch.equal(first["view1"], other["view1"]) and first["view1"].shape == inputs.shape
    images.setup("fit")
    sampler = images._train_sampler(num_replicas=1, rank=0, seed=0)
    labelled = images.train_dataset.extras["labelled"][torch.tensor(list(sampler))]
    assert 0.4 < labelled.float().mean() < 0.6  # a quarter of the training set, half of each epoch


def test_self_distillation_and_mean_entropy_by_hand():
    # one sample, two views, two classes; teacher temperature 0.5 doubles the cosine scores
    student = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # view 1: p = (1/4, 3/4)
    cosine = torch.tensor([[0.0, 0.5 * math.log(3.0)], [0.0, 0.0]])  # teacher view 1: (1/4, 3/4); view 2: (1/2, 1/2)
    # view 1's teacher (1/4, 3/4) against view 2's student (3/4, 1/4), view 2's teacher (1/2, 1/2) against view 1's
    ce_a = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    ce_b = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert float(self_distillation(student, cosine, 0.5)) == pytest.approx((ce_a + ce_b) / 2)
    assert float(mean_entropy_gap(student)) == pytest.approx(0.0, abs=1e-6)  # mean prediction (1/2, 1/2)
    confident = torch.tensor([[50.0, 0.0, 0.0]] * 4)
    assert float(mean_entropy_gap(confident)) == pytest.approx(math.log(3), abs=1e-5)


def test_supervised_contrast_is_supcon_over_the_labelled_rows():
    """Khosla et al.'s loss written out with loops over the labelled rows of both views."""
    torch.manual_seed(0)
    projections, labels = torch.randn(8, 5), torch.tensor([0, 1, 0, -1, 0, 1, 0, -1])
    labelled = labels >= 0
    z = F.normalize(projections, dim=-1)
    rows = [i for i in range(8) if labelled[i]]
    expected = 0.0
    for i in rows:
        others = [j for j in rows if j != i]
        log_norm = torch.logsumexp(torch.stack([z[i] @ z[j] / 0.5 for j in others]), 0)
        positives = [j for j in others if labels[j] == labels[i]]
        expected += -sum(float(z[i] @ z[j] / 0.5 - log_norm) for j in positives) / len(positives)
    result = supervised_contrastive(projections, labels, labelled, 0.5)
    assert float(result) == pytest.approx(expected / len(rows), rel=1e-5)


def blobs(**kwargs):
    return DiscoveryDataModule("blobs", known_classes=[0, 1, 2], generated_samples=240, batch_size=32, **kwargs)


def module_for(data, **kwargs):
    return DiscoveryModule("mlp", input_shape=data.input_shape, num_classes=data.num_classes,
                           num_known_classes=data.num_known_classes, backbone_kwargs={"hidden_sizes": [16]},
                           projection_hidden_dim=16, projection_dim=8, **kwargs)


def quiet(**kwargs):
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     **{"enable_checkpointing": False, **kwargs})


@pytest.mark.parametrize("module_kwargs", [{}, {"sup_weight": 1.0, "assign": "kmeans", "kmeans_init": 1}])
def test_a_fit_logs_every_term_and_clustering_accuracy_of_its_predictions(module_kwargs):
    """SimGCD (stacked with SAM from another family: the contract's second pass; bf16-mixed, two
    micro-batches per step) or the k-means arm; test logs all / old / new of the pool and of the
    held-out split, and the head's values are the metric of the head's own argmax."""
    L.seed_everything(0)
    data, trainer = blobs(), quiet(max_steps=2, accumulate_grad_batches=2, precision="bf16-mixed",
                                   limit_val_batches=0, callbacks=[SAM(rho=0.05)])
    module = module_for(data, **module_kwargs)
    trainer.fit(module, datamodule=data)
    terms = {"ce", "supcon"} | (set() if module_kwargs else {"distill", "memax", "infonce"})
    assert {f"train/simgcd/{t}" for t in terms} <= set(trainer.callback_metrics)
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    keys = {f"test/{p}acc_{g}" for p in ("pool_", "") for g in ("all", "old", "new")}
    assert keys <= set(logged) and all(0.0 <= logged[k] <= 1.0 for k in keys)
    if not module_kwargs:
        test = data.test_dataset
        module.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            preds = module(test.inputs).argmax(-1)
        direct = ClusteringAccuracy(data.num_classes, data.num_known_classes)
        held_out = ~test.extras["pool"]
        direct.update(preds[held_out], test.extras["true_target"][held_out])
        assert logged["test/acc_all"] == pytest.approx(float(direct.compute()["all"]), abs=1e-6)


def test_resume_mid_epoch_is_exact(tmp_path):
    """Views are drawn from the batch number: a run stopped mid-epoch and resumed ends on the same weights."""
    def run(max_steps, ckpt_path=None, checkpoint=None):
        L.seed_everything(0)
        data = blobs()
        module = module_for(data)
        extra = dict(enable_checkpointing=True, callbacks=[checkpoint]) if checkpoint else {}
        quiet(max_steps=max_steps, limit_val_batches=0, **extra).fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    straight = run(9)
    run(5, checkpoint=ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1))
    (ckpt,) = tmp_path.glob("*step=5.ckpt")
    resumed = run(9, ckpt_path=str(ckpt))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_module_and_protocol_refuse_bad_arguments_at_construction():
    with pytest.raises(ValueError, match="num_known_classes 4"):
        DiscoveryModule("mlp", input_shape=(4,), num_classes=4, num_known_classes=4)
    with pytest.raises(ValueError, match="sup_weight"):
        DiscoveryModule("mlp", input_shape=(4,), num_classes=4, num_known_classes=2, sup_weight=1.5)
    protocol = DiscoveryProtocol("c", {})
    with pytest.raises(ClaimError, match="unknown field"):
        protocol.check_arm("a", {"modul": {}})
    with pytest.raises(ClaimError, match="assign 'spectral'"):
        protocol.check_arm("a", {"module": {"assign": "spectral"}})
    with pytest.raises(ClaimError, match="both known and novel"):
        DiscoveryProtocol("c", {"data": {"known_classes": [0, 1], "novel_classes": [1]}})


@pytest.mark.parametrize("name", ["reglab.metrics.clustering", "reglab.tasks.discovery", "reglab.datamodules.discovery"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0 and result.failed == 0
