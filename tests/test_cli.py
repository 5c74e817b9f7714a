"""The reglab command: config composition, error messages, run folders, resume, and a smoke run
of every YAML under configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reglab.callbacks import ELR, LabelSmoothing
from reglab.checkpoints import PRETRAIN_ARGS_ENV
from reglab.cli import ReglabCLI, main, merge_technique_configs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]


def cli(*args: str) -> ReglabCLI:
    return ReglabCLI(args=merge_technique_configs(list(args)), run=False)


def techniques_of(trainer) -> list:
    return [cb for cb in trainer.callbacks if isinstance(cb, (ELR, LabelSmoothing))]


def test_second_file_adds_a_technique_without_repeating_the_first(tmp_path):
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"),
                "--config", str(CONFIGS / "technique/label_smoothing.yaml"), f"--runs_dir={tmp_path}")
    assert [type(t) for t in techniques_of(built.trainer)] == [ELR, LabelSmoothing]


def test_later_file_overrides_one_argument_and_null_removes(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"techniques": {"elr": {"init_args": {"lam": 7.0}}}}))
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(override), f"--runs_dir={tmp_path}")
    (elr,) = techniques_of(built.trainer)
    assert (elr.lam, elr.beta) == (7.0, 0.7)
    remove = tmp_path / "remove.yaml"
    remove.write_text("techniques:\n  elr: null\n")
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(remove), f"--runs_dir={tmp_path}")
    assert techniques_of(built.trainer) == []


def test_another_class_under_the_same_name_drops_the_old_init_args(tmp_path):
    swap = tmp_path / "swap.yaml"
    swap.write_text("techniques:\n  elr:\n    class_path: reglab.callbacks.LabelSmoothing\n")
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), "--config", str(swap), f"--runs_dir={tmp_path}")
    (smoothing,) = techniques_of(built.trainer)
    assert isinstance(smoothing, LabelSmoothing)  # ELR's beta and lam would have been rejected


def test_model_shape_is_filled_from_the_datamodule(tmp_path):
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}")
    assert built.model.hparams.num_classes == 10 and tuple(built.model.hparams.input_shape) == (1, 8, 8)


def test_config_error_names_key_and_accepted_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("--config", str(CONFIGS / "experiment/quickstart.yaml"),
            "--data.init_args.label_noise.kind=sideways", f"--runs_dir={tmp_path}")
    err = capsys.readouterr().err
    assert "label_noise.kind" in err and "symmetric" in err and "pairflip" in err


def test_unknown_backbone_names_accepted_values(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'.*cnn.*mlp"):
        cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), "--model.init_args.backbone=resnet9000", f"--runs_dir={tmp_path}")


def test_run_folder_has_logs_config_checkpoint_and_resumes_with_last(tmp_path, capsys):
    base = ["fit", "--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}", *FAST]
    main(base)
    run = tmp_path / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert list(run.glob("events.out.tfevents.*")), sorted(p.name for p in run.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out
    assert "test accuracy (clean labels)" in out and str(run) in out

    main([*base[:-len(FAST)], "--trainer.max_epochs=2", *FAST[1:], "--ckpt_path", "last"])
    assert not (tmp_path / "quickstart" / "version_1").exists(), "resume must continue in the same folder"
    import torch
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and "elr" in state["callbacks"]


def test_ckpt_path_last_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints/last.ckpt"):
        main(["fit", "--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}", "--ckpt_path", "last"])


#: config files that cannot run on the default experiment's CNN, or do nothing there, with the experiment they
#: need: S²FT selects attention heads and FFN channels of Linear layers (the CNN has none outside its head);
#: correlated feature masking trains a two-tower model's item tower; TCM regularizes, and ECAML confuses, a
#: metric-learning embedding; T-JEPA reads flat tabular features; text dropout drops the text of a multi-input
#: retrieval model's queries; CoOp's prompt tuning learns a CLIP text tower's context; the sparse-retrieval
#: techniques regularize a sparse retriever's passage vectors and KaLM-Embedding-V2 reweights a dense one's loss;
#: FPGM's consistency reads unlabelled images, which only the shifted scenes have; the domain-generalization
#: techniques need batches that carry `domain`; a segmentation model file overrides its segmentation experiment
#: (the dense-module claims' baselines); personalization tunes a text-conditional diffusion model; the discovery
#: techniques read a DiscoveryModule's views and classifier (tabular NCD: in an NCD split); DictAS replaces the
#: anomaly module's lookup.
NEEDS_EXPERIMENT = {"s2ft.yaml": "peft_finetune_vit.yaml", "correlated_feature_masking.yaml": "recsys_two_tower.yaml",
                    "tcm.yaml": "digits_retrieval.yaml", "ecaml.yaml": "digits_retrieval.yaml",
                    "t_jepa.yaml": "tabular_t_jepa.yaml", "text_dropout.yaml": "hinted_digits_retrieval.yaml",
                    "fpgm.yaml": "shifted_scenes.yaml", "fpgm_self_training.yaml": "shifted_scenes.yaml",
                    **{f"{t}.yaml": "domain_digits_erm.yaml"
                       for t in ("coral", "irm", "vrex", "fish", "fishr", "hessian_alignment", "drm")},
                    **{f"{t}.yaml": "text_sparse_retrieval.yaml" for t in ("flops_regularizer", "inference_free_sparse_retrieval")},
                    "unet_fusion_add.yaml": "scenes_freqfusion.yaml", "unet_dilated.yaml": "scenes_fadc.yaml",
                    "kalm_embedding_v2.yaml": "text_dense_retrieval.yaml", "prompt_tuning.yaml": "tiny_clip_prompt_tuning.yaml",
                    "ogen.yaml": "tiny_clip_prompt_tuning.yaml", "mmrl.yaml": "tiny_clip_prompt_tuning.yaml",
                    "cpe_clip.yaml": "fewshot_captioned_digits_cpe_clip.yaml",
                    **{f"{t}.yaml": "digits_text_diffusion.yaml" for t in ("class_diffusion", "plain_personalization")},
                    **{f"{t}.yaml": "discovery_digits.yaml" for t in ("cr_kd", "lego_gcd")},
                    "tabular_ncd.yaml": "discovery_tabular_ncd.yaml", "fadernets.yaml": "music_vae.yaml",
                    "dictas.yaml": "anomaly_scenes.yaml", "happy.yaml": "continual_discovery_digits.yaml"}


def _smoke_sets() -> list[list[Path]]:
    """Every config file, completed into a runnable set with the fewest other files."""
    sets = [[path] for path in sorted((CONFIGS / "experiment").glob("*.yaml"))]
    for kind in ("data", "model", "technique", "trainer"):
        for path in sorted((CONFIGS / kind).glob("*.yaml")):
            experiment = NEEDS_EXPERIMENT.get(path.name, "noisy_digits.yaml") if kind in ("technique", "model") else "noisy_digits.yaml"
            sets.append([CONFIGS / "experiment" / experiment, path])
    return sets


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """One working folder for every config run: paths a config leaves relative (a ModelCheckpoint's dirpath,
    the pretrained-backbone cache under runs/) land there, not in the checkout, and configs that pretrain
    the same backbone still share one cached fit."""
    return tmp_path_factory.mktemp("config_runs")


@pytest.mark.parametrize("paths", _smoke_sets(), ids=lambda ps: str(ps[-1].relative_to(CONFIGS)))
def test_every_config_runs(paths, tmp_path, monkeypatch, config_folder):
    monkeypatch.chdir(config_folder)
    monkeypatch.setenv(PRETRAIN_ARGS_ENV, " ".join(FAST))  # a config's pretraining runs at the same budget
    args = ["fit"]
    for path in paths:
        args += ["--config", str(path)]
    main([*args, f"--runs_dir={tmp_path}", "--trainer.logger=false", *FAST])


def test_optimizer_and_scheduler_from_lightningcli_arguments(tmp_path):
    built = cli("--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}",
                "--optimizer=SGD", "--optimizer.lr=0.05", "--optimizer.momentum=0.9",
                "--lr_scheduler=CosineAnnealingLR", "--lr_scheduler.T_max=30")
    optimizers = built.model.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers[0][0]
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["lr"] == 0.05


def test_validate_test_and_predict_from_a_checkpoint(tmp_path, capsys):
    common = ["--config", str(CONFIGS / "experiment/quickstart.yaml"), f"--runs_dir={tmp_path}", *FAST]
    main(["fit", *common, "--test_after_fit=false"])
    ckpt = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    for subcommand in ("validate", "test", "predict"):
        main([subcommand, *[a for a in common if not a.startswith("--trainer.max_epochs")
                            and not a.startswith("--trainer.limit_train")], f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert "test/acc" in out and "val/acc" in out
