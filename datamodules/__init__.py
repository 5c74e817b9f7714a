"""reglab's DataModules: every batch is a dict with ``input``, ``target``, ``index`` (and extras).

Embedded data needs no download (:class:`DigitsDataModule`, :class:`TabularDataModule`,
:class:`SyntheticDataModule`, query–item interactions for retrieval: :class:`RecommendationDataModule`, a generated
query–passage retrieval corpus: :class:`TextRetrievalDataModule`, segmentation scenes of digits with noisy masks:
:class:`DigitScenesDataModule`, :class:`MaskNoise`; few-shot anomaly segmentation on them, with normal references
and synthesized anomalies: :class:`AnomalyScenesDataModule`; metric learning's open-world split of the digits:
:class:`OpenWorldDigitsDataModule`; digits with generated captions for image–text pretraining:
:class:`CaptionedDigitsDataModule`; generated piano-roll bars with measured musical attributes:
:class:`MusicDataModule`); :class:`CIFARDataModule` and
:class:`ImageFolderDataModule` read the papers' datasets from disk. All share
:class:`DictDataModule`'s mid-epoch resumable training loader; the classification ones also
:class:`ClassificationDataModule`'s label noise (:class:`LabelNoise`) and class imbalance (:class:`LongTail`).
The training samplers (the resumable shuffle, repeat factor sampling, m per class) are in
:mod:`reglab.datamodules.sampling`.
"""

from reglab.lazy import lazy_names

# imported on first access (PEP 562): one DataModule does not load the others' dependencies
_MODULES = {
    "base": ["ClassificationDataModule", "DictDataModule", "DictDataset", "LazyInputs", "ResumableDataLoader"],
    "captions": ["CaptionedDigitsDataModule"],
    "cifar": ["CIFARDataModule"],
    "class_split": ["ClassSplitDataModule"],
    "digits": ["DigitsDataModule"],
    "anomaly_scenes": ["ANOMALY_KINDS", "AnomalyScenesDataModule", "add_noise", "changed_pixels", "cut_out", "paste_patch",
                       "synthesize_anomaly"],
    "discovery": ["ContinualDiscoveryDataModule", "DiscoveryDataModule"],
    "domains": [
        "DOMAINS", "DomainBalancedSampler", "DomainDigitsDataModule", "PALETTE", "RotatedDigitsDataModule", "label_colours",
        "render_domain", "rotate_images",
    ],
    "hinted_digits": ["HINT_TEMPLATES", "HintedDigitsDataModule", "VARIANTS"],
    "drifting_stream": ["DriftingDigitsDataModule", "drifting_order", "rotate_each"],
    "image_folder": ["ImageFolderDataModule", "ImageFolderInputs"],
    "label_noise": ["CIFAR10_ASYMMETRIC_MAP", "CIFAR100_ASYMMETRIC_MAP", "MNIST_ASYMMETRIC_MAP", "LabelNoise", "apply_label_noise"],
    "long_tail": ["LongTail", "apply_long_tail", "long_tail_class_counts"],
    "music": ["ATTRIBUTES", "MusicDataModule", "arousal", "attributes", "generate_rolls"],
    "open_world": ["OpenWorldDigitsDataModule"],
    "pydoc_text": ["PydocTopicsDataModule", "pydoc_topics"],
    "recommendation": ["ITEM_FIELDS", "QUERY_FIELDS", "RecommendationDataModule"],
    "retrieval_text": ["RetrievalCorpus", "TextRetrievalDataModule", "generate_corpus", "token_overlap"],
    "sampling": ["MPerClassSampler", "RepeatFactorSampler", "ResumableSampler", "repeat_factors_irfs", "repeat_factors_rfs"],
    "scenes": [
        "DigitScenes", "DigitScenesDataModule", "MaskNoise", "NUM_SCENE_CLASSES", "SceneStyle", "UNLABELLED",
        "apply_mask_noise", "apply_scene_style", "long_tail_class_weights", "make_digit_scenes",
    ],
    "si_blurry": ["SiBlurryDataModule", "SiBlurryStream", "si_blurry_stream"],
    "splits": ["keep_at_most", "stratified_split"],
    "synthetic": ["SyntheticDataModule"],
    "tabular": ["TabularDataModule"],
    "tasks": ["TaskSequenceDataModule", "TaskSubset", "split_classes"],
    "text": ["TemplatedSentimentDataModule", "ComparisonsDataModule", "TokenizedTextDataModule"],
}

__getattr__, __dir__, __all__ = lazy_names(
    __name__, {name: f"{__name__}.{module}" for module, names in _MODULES.items() for name in names}
)
