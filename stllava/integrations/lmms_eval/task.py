"""The lmms-eval task class of the stllava tasks: documents from local files, never a hub download.

Imported by lmms-eval only (the task YAMLs name it with ``class:``). It is lmms-eval's own
``ConfigurableTask`` except :meth:`LocalVQATask.download`, which builds the test split from the
benchmark named in the YAML's ``dataset_kwargs`` with :func:`..benchmarks.load_docs`.
"""
from __future__ import annotations

import datasets
from lmms_eval.api.task import ConfigurableTask

from stllava.integrations.lmms_eval.benchmarks import load_docs


class LocalVQATask(ConfigurableTask):
    """A VQA task whose ``test`` split is a converted benchmark on disk (docs/Evaluation.md#lmms-eval)."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        # lmms-eval passes the YAML's own `class` key along; TaskConfig has no such field.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        """Set ``self.dataset`` (and ``dataset_no_image``: the documents hold paths, not images)."""
        docs = load_docs((dataset_kwargs or {}).get("benchmark", ""))
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset
