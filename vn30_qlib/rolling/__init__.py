"""Rolling retraining (RR) and DDG-DA of the VN30 workflows through Qlib's own ``qlib.contrib.rolling``: `bridge`
(`VN30Rolling`), `ddgda` (`VN30DDGDA`) and the ``vn30-qlib rolling`` command (`command`)."""
