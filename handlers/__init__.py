"""Qlib data handlers for VN30 (``module_path: handlers`` in the workflow YAMLs)."""

from handlers.vn30_alpha158 import VN30Alpha158, alpha158_feature_config
from handlers.vn30_tft import VN30TFT

__all__ = ["VN30Alpha158", "VN30TFT", "alpha158_feature_config"]
