"""The data sets bridge can load by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.config import DataConfig
from bridge.data.adapters import generic, medqa, mmlu, pubmedqa, tatqa, twitter
from bridge.data.io import RowChecker
from bridge.data.source import SourceData
from bridge.errors import ConfigError


@dataclass(frozen=True)
class AdapterInfo:
    """A data set adapter: its name, folder, format and loader."""

    name: str
    format: str
    description: str
    load: Callable[[DataConfig, Path, RowChecker], SourceData]
    #: Files inside the data set folder that must exist (globs allowed); empty for generic.
    files: tuple[str, ...] = ()

    @property
    def needs_folder(self) -> bool:
        return bool(self.files)


ADAPTERS: dict[str, AdapterInfo] = {
    info.name: info
    for info in (
        AdapterInfo(
            pubmedqa.NAME,
            "yes_no_maybe",
            "PubMedQA PQA-L: 1000 expert-labelled biomedical questions over abstracts, long answers as explanations",
            pubmedqa.load,
            (pubmedqa.DATA_FILE, pubmedqa.TEST_FILE),
        ),
        AdapterInfo(
            medqa.NAME,
            "multiple_choice",
            "MedQA-USMLE, 4 options: the official test split (1273 questions) carved into train, dev and test",
            medqa.load,
            (medqa.DATA_FILE,),
        ),
        AdapterInfo(
            mmlu.NAME,
            "multiple_choice",
            "MMLU law, medicine, accounting and econometrics subjects; dev files are the few-shot pool",
            mmlu.load,
            ("dev/*_dev.csv", "val/*_val.csv", "test/*_test.csv"),
        ),
        AdapterInfo(
            tatqa.NAME,
            "numeric + span",
            "TAT-QA: questions over financial tables and text; numeric, span, multi-span and count answers",
            tatqa.load,
            (tatqa.DEV_FILE, tatqa.TEST_FILE),
        ),
        AdapterInfo(
            twitter.NAME,
            "classification",
            "Twitter financial news sentiment: bearish, bullish or neutral",
            twitter.load,
            (twitter.TRAIN_FILE, twitter.VALID_FILE),
        ),
        AdapterInfo(
            generic.NAME,
            "any",
            "Your own JSONL, JSON, CSV or TSV files, described by data.format and data.fields",
            generic.load,  # type: ignore[arg-type]
        ),
    )
}


def get_adapter(name: str) -> AdapterInfo:
    """Return the adapter called ``name``, or raise :class:`ConfigError` listing the valid names."""
    info = ADAPTERS.get(name)
    if info is None:
        raise ConfigError(
            f"data.dataset: unknown data set '{name}'",
            hint=f"choose one of: {', '.join(ADAPTERS)} (run 'bridge data list')",
        )
    return info


#: Settings that only one adapter reads; setting them for another data set is an error.
ADAPTER_ONLY_SETTINGS: dict[str, str] = {
    "subjects": mmlu.NAME,
    "answer_types": tatqa.NAME,
    "train_file": generic.NAME,
    "dev_file": generic.NAME,
    "test_file": generic.NAME,
    "format": generic.NAME,
    "labels": generic.NAME,
    "label_map": generic.NAME,
    "domain": generic.NAME,
}


def check_settings_apply(cfg: DataConfig) -> None:
    """Raise :class:`ConfigError` when a setting for another adapter is set, since it would be ignored."""
    misplaced = [
        f"data.{key} (read only by {owner})"
        for key, owner in ADAPTER_ONLY_SETTINGS.items()
        if owner != cfg.dataset and getattr(cfg, key) is not None
    ]
    if cfg.dataset != generic.NAME:
        defaults = DataConfig.model_fields
        if cfg.fields != defaults["fields"].default_factory():  # type: ignore[misc]
            misplaced.append(f"data.fields (read only by {generic.NAME})")
        if cfg.encoding != defaults["encoding"].default:
            misplaced.append(f"data.encoding (read only by {generic.NAME})")
    if misplaced:
        raise ConfigError(
            f"data set '{cfg.dataset}' does not read: {', '.join(misplaced)}",
            hint="remove these settings, or set data.dataset to the data set that reads them",
        )
