"""Qlib `Model` subclasses: one model per file (``module_path: vn30_qlib.models.<file>`` in a workflow)."""
