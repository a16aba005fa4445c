"""Qlib's mlflow experiment manager for this package's sqlite stores, in a module of its own: Qlib imports it by
name when ``qlib.init`` builds the recorder (`vn30_qlib.loop.folder_exp_manager`), so importing the loop does not
import ``qlib.workflow`` (about a second)."""
from __future__ import annotations

from qlib.workflow.exp import MLflowExperiment
from qlib.workflow.expm import MLflowExpManager

from vn30_qlib.loop import create_tracking_store


class FolderExpManager(MLflowExpManager):
    """Qlib's mlflow experiment manager whose new experiments keep their artifacts beside their sqlite database
    (`create_tracking_store`), not in the ``./mlruns`` of whatever folder the process started in."""

    def create_exp(self, experiment_name: str | None = None) -> MLflowExperiment:
        return MLflowExperiment(create_tracking_store(self.uri, experiment_name), experiment_name, self.uri)
