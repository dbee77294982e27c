"""The end-of-run summary, on a hand-written history."""

from __future__ import annotations

import pytest

from kltrain.tracking import summarise


def test_summary_first_and_last_windows_and_final_divergences():
    history = [
        {
            "step": i,
            "reward/mean": 0.0,  # e.g. whitened: centred every step
            "reward/raw/sentiment": 0.5 + i / 10,
            "divergence/reverse_kl": 0.1 * i,
            "divergence/js": 0.01 * i,
        }
        for i in range(1, 7)
    ]
    out = summarise(history, window=3)
    assert out["steps"] == 6
    assert out["reward_first"] == 0.0 and out["reward_last"] == 0.0
    assert out["sentiment_first"] == pytest.approx(0.7)  # mean of 0.6, 0.7, 0.8
    assert out["sentiment_last"] == pytest.approx(1.0)  # mean of 0.9, 1.0, 1.1
    assert out["reverse_kl_final"] == pytest.approx(0.6)
    assert out["js_final"] == pytest.approx(0.06)
    assert "forward_kl_final" not in out  # not logged, not invented


def test_empty_history_has_no_summary():
    assert summarise([]) == {}
