"""Qlib data handlers for VN30 (``module_path: handlers`` in the workflow YAMLs)."""

from handlers.vn30_alpha158 import VN30Alpha158, alpha158_feature_config

__all__ = ["VN30Alpha158", "alpha158_feature_config"]
