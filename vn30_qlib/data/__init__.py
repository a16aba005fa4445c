"""Data spine: real-CSV ingestion, the simulated default market and the one Qlib provider writer."""
