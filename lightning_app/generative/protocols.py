"""The ``sample_quality`` claims protocol: fit a generative model, sample it, measure the samples.

An arm is a ``reglab fit`` run as in the ``fit`` protocol (the shared ``configs`` plus the arm's, the
seed as ``seed_everything`` and data seed); after its test run the fitted model (the EMA weights
where the config averages them) draws ``per_class`` samples per digit (a conditional model) or ten
times that (an unconditional one), seeded by the seed, with the ``sample`` settings (``steps``,
``sampler``, ``guidance_scale``: the module's own where not given), and
:func:`reglab.generative.measures.sample_quality` scores them against the digits' test split of that
seed with the in-repo digits classifier (not Inception; fitted once from ``classifier_config`` on the
seed-0 split and cached under ``cache_dir``, so for other seeds it has seen some of the reference
images: its ``reference_accuracy`` is then optimistic, the Fréchet distance only compares arms)::

    name: digits_diffusion_guidance
    protocol: sample_quality
    module: reglab.generative.protocols
    settings: {configs: [configs/experiment/digits_diffusion.yaml], per_class: 50}
    arms:
      conditional: {}
      guided: {configs: [configs/technique/<a config that sets guidance_scale>.yaml]}
    checks:
      - {metric: conditional_accuracy, direction: higher, arm: guided, against: conditional}

Each run reports the test metrics (``test/loss``) and ``fd_classifier_features``,
``conditional_accuracy``, ``nearest_train_distance`` and their references; the results page shows a grid
of each arm's first-run samples (:func:`reglab.generative.sample.claim_grid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reglab.bench.fit import FitProtocol
from reglab.bench.protocols import ClaimError, register_protocol
from reglab.generative.measures import CACHE_DIR, CLASSIFIER_CONFIG
from reglab.generative.sample import DIGIT_CLASSES, claim_grid, draw_samples, measure

SAMPLE_SETTINGS = ("steps", "sampler", "guidance_scale")


@register_protocol("sample_quality")
class SampleQualityProtocol(FitProtocol):
    defaults = {**FitProtocol.defaults, "per_class": 50, "sample": {}, "classifier_config": CLASSIFIER_CONFIG,
                "cache_dir": CACHE_DIR}

    def check_settings(self) -> None:
        unknown = set(self.settings["sample"]) - set(SAMPLE_SETTINGS)
        if unknown:
            raise ClaimError(f"claim {self.claim_name}: sample setting(s) {sorted(unknown)}. Fix: use "
                             f"{list(SAMPLE_SETTINGS)} (the module's own value where one is left out).")
        if not Path(self.settings["classifier_config"]).is_file():
            raise ClaimError(f"claim {self.claim_name}: classifier_config {self.settings['classifier_config']} not "
                             "found. Fix: run from the repository root or give a `reglab fit` config of a digits "
                             "ClassificationModule.")

    def run_arm(self, arm: str, spec: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
        cli, metrics = self.fit_and_test(self.arguments(spec, seed, workdir))
        per_class = self.settings["per_class"]
        samples, labels = draw_samples(cli.model.eval(), per_class, {**self.settings["sample"], "seed": seed},
                                       DIGIT_CLASSES * per_class)
        self.keep_figure(arm, "samples", lambda: claim_grid(samples, labels, cli.model, per_class))
        quality = measure(samples, labels, seed, self.settings["classifier_config"], self.settings["cache_dir"])
        return {**metrics, **{key: value for key, value in quality.items() if isinstance(value, float)}}
