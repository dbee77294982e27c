"""The end-of-run summary, on a hand-written history."""

from __future__ import annotations

import pytest

from kltrain.training.tracking import progress_fields, summarise, summary_line


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


def test_progress_bar_shows_raw_terms_trained_divergence_and_coef_not_the_whitened_total():
    metrics = {
        "reward/mean": 5.588e-09,  # whitened: ≈ 0 every step, meaningless on the bar
        "reward/sentiment": 5.588e-09,
        "reward/raw/sentiment": 0.61,
        "train/reverse_kl/k1": 2.5,
        "train/coef": 0.1,
        "divergence/reverse_kl": 2.4,
        "time/step_seconds": 12.0,
    }
    fields = progress_fields(metrics, trained_metric="train/reverse_kl/k1")
    assert fields == {
        "sentiment": "0.61",
        "reverse_kl/k1": "2.5",
        "coef": "0.1",
        "reverse_kl": "2.4",
        "s/step": "12",
    }
    assert "mean" not in fields and "reward" not in fields


def test_summary_line_hides_a_transformed_total_and_shows_raw_terms_and_finals():
    history = [
        {
            "step": i,
            "reward/mean": 1e-9 * i,
            "reward/raw/sentiment": 0.5 + i / 10,
            "train/reverse_kl/k1": 0.5 * i,
            "train/coef": 0.1,
            "divergence/reverse_kl": 0.1 * i,
        }
        for i in range(1, 7)
    ]
    summary = summarise(history, trained_metric="train/reverse_kl/k1")
    assert summary["reverse_kl/k1_final"] == pytest.approx(3.0)
    assert summary["coef_final"] == pytest.approx(0.1)
    line = summary_line(summary, reward_is_raw=False)
    assert "sentiment (raw) 0.7 → 1" in line
    assert "reward " not in line  # the whitened total (≈ 1e-9) is not shown
    assert "reverse_kl/k1 3" in line and "coef 0.1" in line
    assert "reward 2e-09 → 5e-09" in summary_line(summary, reward_is_raw=True)
