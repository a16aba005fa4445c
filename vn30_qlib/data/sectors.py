"""The VN30 names (the October 2025 list) and their sectors: static reference data, read by the TFT's static
inputs (`vn30_qlib.models.tft_inputs`) and by the simulator, whose sector factors follow it."""
from __future__ import annotations

SECTOR: dict[str, str] = {
    "ACB": "banking",
    "BCM": "real estate",
    "BID": "banking",
    "CTG": "banking",
    "DGC": "materials",
    "FPT": "tech",
    "GAS": "energy",
    "GVR": "materials",
    "HDB": "banking",
    "HPG": "materials",
    "LPB": "banking",
    "MBB": "banking",
    "MSN": "consumer",
    "MWG": "consumer",
    "PLX": "energy",
    "SAB": "consumer",
    "SHB": "banking",
    "SSB": "banking",
    "SSI": "securities",
    "STB": "banking",
    "TCB": "banking",
    "TPB": "banking",
    "VCB": "banking",
    "VHM": "real estate",
    "VIB": "banking",
    "VIC": "real estate",
    "VJC": "industrials",
    "VNM": "consumer",
    "VPB": "banking",
    "VRE": "real estate",
}
SYMBOLS: tuple[str, ...] = tuple(sorted(SECTOR))
SECTORS: tuple[str, ...] = tuple(sorted(set(SECTOR.values())))
