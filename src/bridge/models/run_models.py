"""Load a model by reference or from a run directory, for serving and prediction.

A run directory (``runs/<name>/``, holding ``config.yaml``) supplies its trained student,
``train_student/model/``, when that folder exists. Otherwise it supplies its refined TA, which
is the run's ``models.ta`` base with ``train_ta/adapter/`` (LoRA) merged in memory, or
``train_ta/model/`` after full fine-tuning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.errors import ModelLoadError

if TYPE_CHECKING:
    from bridge.config import BridgeConfig
    from bridge.models.loading import LocalModel

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.yaml"
STUDENT_MODEL_DIR = Path("train_student") / "model"
TA_ADAPTER_DIR = Path("train_ta") / "adapter"
TA_MODEL_DIR = Path("train_ta") / "model"


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder with a run's ``config.yaml`` and is not a model folder."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / RUN_CONFIG_FILE).is_file() and not (folder / "config.json").is_file()


def run_config(run_dir: str | Path) -> BridgeConfig:
    """Return the resolved configuration that a run stored in its ``config.yaml``."""
    from bridge.config import load_config

    return load_config(Path(run_dir).expanduser() / RUN_CONFIG_FILE)


def load_model_or_run(ref: str) -> LocalModel:
    """Load a model reference (folder, hub id, ``packaged:...``) or the best model of a run directory.

    A plain reference loads with the schema's defaults (device and dtype ``auto``).
    """
    from bridge.config import ModelRef
    from bridge.models.loading import load_model

    if is_run_dir(ref):
        return load_run_model(Path(ref).expanduser())
    return load_model(ModelRef(path=ref))


def load_run_model(run_dir: Path) -> LocalModel:
    """Load the trained student of ``run_dir``, or its refined TA when no student was trained yet."""
    from bridge.models.loading import load_model

    config = run_config(run_dir)
    student = run_dir / STUDENT_MODEL_DIR
    if (student / "config.json").is_file():
        ref = config.models.student.model_copy(update={"path": str(student), "keep_layers": None})
        log.info("run %s: loading the trained student from %s", run_dir, student)
        return load_model(ref)

    trained = load_refined_ta(run_dir, config)
    if trained is not None:
        return trained
    raise ModelLoadError(
        f"run directory {run_dir} has no trained model: looked for {STUDENT_MODEL_DIR}/, {TA_ADAPTER_DIR}/ "
        f"and {TA_MODEL_DIR}/",
        hint="run 'bridge run' (or the train-ta stage) with this run's configuration first, or pass a model folder",
    )


def load_refined_ta(run_dir: Path, config: BridgeConfig, base: LocalModel | None = None) -> LocalModel | None:
    """Load the TA after apprenticeship from ``run_dir``, or return None when train-ta has not finished.

    After full fine-tuning that is ``train_ta/model/``. After LoRA it is the TA base with
    ``train_ta/adapter/`` merged in memory. ``base``, when given, is that base already loaded;
    its weights change in place. With ``base`` the model keeps the name that train-ta's TA has
    in memory, so rows written before and after a resume name the same model. Without ``base``
    the name also gives the adapter folder.
    """
    from bridge.models.loading import load_model

    full = run_dir / TA_MODEL_DIR
    if (full / "config.json").is_file():
        ref = config.models.ta.model_copy(update={"path": str(full), "keep_layers": None})
        log.info("run %s: loading the fine-tuned TA from %s", run_dir, full)
        return load_model(ref)

    adapter = run_dir / TA_ADAPTER_DIR
    if (adapter / "adapter_config.json").is_file():
        log.info("run %s: loading the TA base %s with the adapter %s", run_dir, config.models.ta.path, adapter)
        if base is not None:
            return _merge_adapter(base, adapter, describe=False)
        return _merge_adapter(load_model(config.models.ta), adapter)
    return None


def _merge_adapter(lm: LocalModel, adapter: Path, *, describe: bool = True) -> LocalModel:
    """Apply the LoRA adapter in ``adapter`` to ``lm`` and merge it into the weights, in memory.

    ``describe`` adds the adapter folder to the model's name.
    """
    from peft import PeftModel

    from bridge.models.loading import require_safetensors

    require_safetensors(adapter, "adapter")
    try:
        adapted = PeftModel.from_pretrained(lm.model, adapter, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot apply the adapter in {adapter} to the TA base {lm.name!r}: {type(exc).__name__}: {exc}",
            hint="the run's config.yaml must name the base (models.ta) the adapter was trained on",
        ) from None
    lm.model = adapted.merge_and_unload()
    lm.model.eval()
    if describe:
        lm.name = f"{lm.name} + {adapter}"
    else:
        # predict.as_local_model gives train-ta's TA in memory this same name.
        lm.name = getattr(lm.model, "name_or_path", None) or lm.name
    return lm
