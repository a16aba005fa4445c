"""vn30-qlib: Qlib-native baselines (LightGBM, LSTM, TFT) for the VN30 stocks of Vietnam's HOSE exchange."""

__version__ = "0.1.0"
