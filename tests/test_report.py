"""``kltrain compare`` on fixture run folders (kltrain/experiments/report.py): the table's
numbers, the PNGs decoded and checked for size and content, the HTML parsed with its images."""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from kltrain.cli import main
from kltrain.experiments import report as rp

#: (divergence, seed) → (per-step rewards, per-step reverse KL, held-out reward, held-out KL)
FIXTURE = {
    ("reverse_kl", 0): ([0.50, 0.55, 0.60, 0.70], [0.0, 0.2, 0.5, 0.9], 0.66, 1.0),
    ("reverse_kl", 1): ([0.52, 0.58, 0.64, 0.74], [0.0, 0.3, 0.6, 1.1], 0.70, 1.2),
    ("js", 0): ([0.50, 0.60, 0.70, 0.80], [0.0, 0.5, 1.0, 2.0], 0.75, 2.5),
    ("js", 1): ([0.50, 0.61, 0.72, 0.84], [0.0, 0.6, 1.4, 2.4], 0.60, 2.0),
}


def make_run(folder: Path, divergence: str, seed: int, with_eval: bool = True) -> None:
    rewards, kls, held_reward, held_kl = FIXTURE[(divergence, seed)]
    folder.mkdir(parents=True)
    config = {"name": "r", "seed": seed, "kl": {"divergence": divergence, "coef": 0.05},
              "trainer": {"output_dir": str(folder)}, "versions": {"torch": "x"}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"step": i + 1, "reward/mean": r, "divergence/reverse_kl": k, "time/step_seconds": 2.0}
        for i, (r, k) in enumerate(zip(rewards, kls))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_eval:
        metrics = {
            "eval/reward/mean": held_reward,
            "eval/divergence/reverse_kl": held_kl,
            "eval/divergence/forward_kl": held_kl / 2,
            "eval/divergence/js": held_kl / 10,
            "eval/diversity/distinct_2": 0.9 - seed / 10,
            "eval/diversity/self_bleu": 0.1 + seed / 10,
        }
        (folder / "eval.json").write_text(json.dumps({"metrics": metrics}))


@pytest.fixture
def sweep_dir(tmp_path):
    members = []
    for div, seed in FIXTURE:
        name = f"divergence={div},seed={seed}"
        make_run(tmp_path / "sweep" / name, div, seed)
        overrides = {"kl.divergence": div, "seed": seed}
        folder = str(tmp_path / "sweep" / name)
        members.append(
            {"name": name, "folder": folder, "overrides": overrides, "state": "finished"}
        )
    make_run(tmp_path / "sweep" / "part", "js", 0)  # a part-trained member: left out
    part = {"name": "part", "folder": str(tmp_path / "sweep" / "part"), "state": "running"}
    members.append({**part, "overrides": {"kl.divergence": "tv", "seed": 0}})
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"members": members}))
    return tmp_path / "sweep"


def test_table_numbers_are_the_seed_means_and_sample_stds(sweep_dir):
    rows = {r["group"]: r for r in rp.summary_rows(rp.load_runs([sweep_dir]))}
    assert set(rows) == {"divergence=reverse_kl", "divergence=js"}
    rkl = rows["divergence=reverse_kl"]
    last3 = [statistics.fmean([0.55, 0.60, 0.70]), statistics.fmean([0.58, 0.64, 0.74])]
    assert rkl["n"] == 2
    assert rkl["reward (last 3)"] == pytest.approx(
        (sum(last3) / 2, abs(last3[0] - last3[1]) / math.sqrt(2))
    )
    # two seeds: sample std = |a − b| / √2
    assert rkl["held-out reward"] == pytest.approx((0.68, 0.04 / math.sqrt(2)))
    assert rkl["held-out reverse KL"] == pytest.approx((1.1, 0.2 / math.sqrt(2)))
    assert rows["divergence=js"]["held-out JS"] == pytest.approx((0.225, 0.05 / math.sqrt(2)))
    assert rkl["steps"][0] == 4 and rkl["train time (s)"][0] == 8.0
    table = rp.markdown_table(list(rows.values()))
    assert "| divergence=reverse_kl (2) | 0.635 ± 0.026 | 0.680 ± 0.028 | 1.100 ± 0.141 |" in table


def test_pareto_front_by_hand():
    points = [(1.0, 0.66), (1.2, 0.70), (2.5, 0.75), (2.0, 0.60), (1.0, 0.5)]
    # (2.0, 0.60) is beaten by (1.0, 0.66); (1.0, 0.5) by (1.0, 0.66) at equal divergence
    assert rp.pareto_front(points) == [0, 1, 2]


def _decoded(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(io.BytesIO(path.read_bytes()), format="png")
    return image


def _assert_picture(image: np.ndarray) -> None:
    assert image.shape[0] >= 300 and image.shape[1] >= 500  # a readable size
    rgb = image[..., :3]
    non_white = (rgb < 0.95).any(axis=-1).mean()
    assert 0.02 < non_white < 0.6  # lines, text and axes, not a blank or a filled canvas
    colours = {tuple(np.round(px, 1)) for px in rgb.reshape(-1, 3)[::7]}
    assert len(colours) > 5


def test_compare_writes_pictures_with_content_and_a_parsable_html(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", str(sweep_dir), "--out", str(out)]) == 0
    for name in ("reward_vs_step.png", "reverse_kl_vs_step.png", "frontier.png"):
        _assert_picture(_decoded(out / name))
    reward_plot = _decoded(out / "reward_vs_step.png")[..., :3]
    for colour in (rp.COLOURS["reverse_kl"], rp.COLOURS["js"]):  # one colour per divergence
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(reward_plot - rgb).max(axis=-1) < 0.02).sum() > 50
    md = (out / "report.md").read_text()
    assert "![" in md and "frontier.png" in md and "divergence=js (2)" in md
    assert "Not finished, left out: part (running)" in md and "divergence=tv" not in md

    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs, self.cells = [], 0

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])
            self.cells += tag == "td"

    parser = Images()
    parser.feed((out / "report.html").read_text())
    assert len(parser.srcs) == 3 and parser.cells == 2 * 10
    for src in parser.srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        _assert_picture(matplotlib.image.imread(io.BytesIO(base64.b64decode(src[len(prefix) :]))))


def test_loose_run_folders_are_grouped_by_the_keys_that_differ(tmp_path):
    for div, seed in FIXTURE:
        make_run(tmp_path / f"{div}-{seed}", div, seed, with_eval=seed == 0)
    runs = rp.load_runs([tmp_path / f"{d}-{s}" for d, s in FIXTURE])
    assert runs[0].overrides == {"kl.divergence": "reverse_kl", "seed": 0}  # not output_dir
    rows = {r["group"]: r for r in rp.summary_rows(runs)}
    held = rows["divergence=reverse_kl"]["held-out reward"]
    assert held[0] == 0.66 and math.isnan(held[1])  # one seed evaluated: no spread
    assert rp._cell("held-out reward", held) == "0.660"
    out = rp.compare([tmp_path / f"{d}-{s}" for d, s in FIXTURE], tmp_path / "rep")
    assert "Runs without eval.json" in (out / "report.md").read_text()


def test_compare_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "not a run folder (no metrics.jsonl)" in capsys.readouterr().err
