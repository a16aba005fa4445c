"""The Temporal Fusion Transformer as a Qlib model (``module_path: vn30_qlib.models.tft``, ``class: TFT``); its
parts: `sub_modules`, `network`, `model`, `diagnostics`."""
from vn30_qlib.models.tft.model import TFT

__all__ = ["TFT"]
