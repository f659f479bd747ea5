"""stllava inside lmms-eval (EvolvingLMMs-Lab): a model named ``stllava`` and the tasks
``stllava_vqa_rad``, ``stllava_slake`` and ``stllava_pvqa`` (docs/Evaluation.md#lmms-eval).

* :mod:`.answering` — prompts, decoding settings and batched answers through the project's own
  generation path (no lmms-eval import; tested in the project's environment);
* :mod:`.model` — the lmms-eval model class (imports lmms-eval);
* :mod:`.benchmarks` — the local evaluation files a task reads (no lmms-eval import);
* :mod:`.task` — the lmms-eval task class that reads them (imports lmms-eval and datasets);
* ``tasks/`` — the task YAMLs and their ``utils.py`` (scoring by :mod:`stllava.eval.metrics`).

lmms-eval finds the model through the ``lmms_eval.models`` entry point of this project
(pyproject.toml → :func:`model_manifest`) and the tasks through ``--include_path``
:data:`TASKS_DIR`.
"""
from __future__ import annotations

import pathlib

MODEL_ID = "stllava"
MODEL_CLASS_PATH = "stllava.integrations.lmms_eval.model.Stllava"
TASKS_DIR = pathlib.Path(__file__).resolve().parent / "tasks"


def model_manifest():
    """The ``lmms_eval.models`` entry point: returns lmms-eval's ``ModelManifest`` registering
    :data:`MODEL_CLASS_PATH` as model ``stllava`` (imports lmms-eval, so only lmms-eval calls it)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
