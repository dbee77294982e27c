"""Sweeps, held-out evaluation and comparison reports (``kltrain sweep|eval|compare``)."""
