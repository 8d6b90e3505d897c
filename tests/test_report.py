"""Run reports (l2l_ray.report) and TensorBoard logging (l2l_ray.tb) on a run folder in the driver's format.

The headless-Chromium test renders the page and checks the screenshot shows the plots and the gallery;
it is skipped where /usr/bin/chromium is absent (Debian: ``apt-get install -y chromium``). Set
``L2L_REPORT_EXAMPLE=docs/report_example.png`` to keep its screenshot.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from l2l_ray import report
from l2l_ray.config import Config
from l2l_ray.report import GALLERY_COLUMNS, load_gallery, round_rows, round_table, save_gallery, write_report
from l2l_ray.tb import TBLogger, read_scalars, scalar_items

CHROMIUM = "/usr/bin/chromium"
S, G = 64, 4
WARMUP_VAL = {"mIoU": 0.2468, "oIoU": 0.2975, "n": 120}


def _split(miou: float, oiou: float, n: int) -> dict:
    return {"mIoU": miou, "oIoU": oiou, "prec@0.5": 0.5, "prec@0.6": 0.4, "prec@0.7": 0.3, "prec@0.8": 0.2,
            "prec@0.9": 0.1, "n": n}


def _round(r: int) -> dict:
    return {"round": r, "val": {"mIoU": 0.30 + 0.05 * r, "oIoU": 0.35 + 0.04 * r},
            "reward": {"prior": 0.1 * r, "consistency": 0.2, "progress": 0.05 * r, "labeled_iou": 0.3,
                       "total": 0.5 + 0.1 * r},
            "trusted_pixel_share": 0.6 + 0.05 * r, "rejected_share": 0.4 - 0.05 * r, "pseudo_iou_diag": 0.5 + 0.1 * r,
            "seconds": 10.0 + r}


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2  # (S, S) bool


def _gallery_arrays() -> dict:
    """G pairs with drawn shapes: a red disc or blue square as truth; the prediction is it shifted by 3 px."""
    images = np.full((G, S, S, 3), 200, np.uint8)
    truth = np.zeros((G, S, S), bool)
    for i in range(G):
        if i % 2 == 0:
            truth[i] = _disc(20 + 6 * i, 30, 10)
            images[i][truth[i]] = (220, 30, 30)
        else:
            truth[i, 10:40, 15 + 4 * i:45 + 4 * i] = True
            images[i][truth[i]] = (30, 30, 220)
    pred = np.roll(truth, 3, axis=2)
    teacher = (np.clip(truth * 0.8 + pred * 0.2, 0, 1) * 255).astype(np.uint8)
    core = np.logical_and(truth, pred)
    pseudo = np.full((G, S, S), 128, np.uint8)
    pseudo[core] = 255
    pseudo[~np.logical_or(truth, pred)] = 0
    boxes = np.array([[0.1, 0.2, 0.6, 0.7], [0.2, 0.15, 0.75, 0.65], [np.nan] * 4, [0.3, 0.1, 0.95, 0.65]],
                     np.float32)
    proposals = np.zeros((G, S, S), np.uint8)
    for i, b in enumerate(boxes):
        if np.isfinite(b).all():
            x1, y1, x2, y2 = (b * S).astype(int)
            proposals[i, y1:y2, x1:x2] = 180
    sentences = ["the red disc on the left", "blue square", "red disc, no prior <b>&", "the small blue square right"]
    return dict(images=images, sentences=sentences, prior_boxes=boxes, proposals=proposals, teacher=teacher,
                pseudo=pseudo, pred=pred.astype(np.uint8) * 255, truth=truth.astype(np.uint8) * 255)


def _make_run(run: Path, rounds: int = 3, gallery: bool = True, method: str = "l2l") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    Config().save(run / "config.yaml")
    metrics = {"method": method, "label_ratio": 0.01,
               "splits": {"val": _split(0.4123, 0.4567, 120), "testA": _split(0.3901, 0.4012, 80)},
               "rounds": [_round(r) for r in range(1, rounds + 1)],
               "warmup_val": WARMUP_VAL if method != "supervised" else None,  # as the driver writes it
               "timing": {"total_s": 123.4, "round_s": {"mean": 10.5}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    if gallery:
        save_gallery(run, **_gallery_arrays())
    return run


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a":
            self.hrefs.append(a["href"])


def test_save_gallery_roundtrip_and_errors(tmp_path):
    arrays = _gallery_arrays()
    path = save_gallery(tmp_path, **arrays)
    assert path == str(tmp_path / "gallery.npz")
    back = load_gallery(tmp_path)
    assert back["sentences"].tolist() == arrays["sentences"]
    assert np.array_equal(back["pseudo"], arrays["pseudo"]) and np.isnan(back["prior_boxes"][2]).all()
    assert load_gallery(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="pred is bool"):
        save_gallery(tmp_path, **{**arrays, "pred": arrays["pred"] > 0})
    with pytest.raises(ValueError, match="3 sentences for 4 images"):
        save_gallery(tmp_path, **{**arrays, "sentences": arrays["sentences"][:3]})


def test_write_report_full_run(tmp_path):
    run = _make_run(tmp_path / "run")
    page_path = write_report(run)
    assert page_path == str(run / "report.html")
    page = Path(page_path).read_text()
    # the metric table, in percent: val mIoU 0.4123 -> 41.23, testA oIoU 0.4012 -> 40.12
    assert "id='metrics'" in page and "<td>41.23</td>" in page and "<td>40.12</td>" in page
    assert "<td>120</td>" in page
    assert "red disc, no prior &lt;b&gt;&amp;" in page  # sentences escaped
    refs = _Refs()
    refs.feed(page)
    assert len(refs.imgs) == 3 + 6 * G  # three charts + six panels per gallery pair, all embedded
    assert all(src.startswith("data:image/png;base64,") for src in refs.imgs)
    for name in ("curves.png", "rewards.png", "shares.png", "gallery.png"):
        assert f"report/{name}" in refs.hrefs
    for href in refs.hrefs:
        img = np.asarray(Image.open(run / href).convert("RGB"))
        assert img.std() > 5, f"{href} looks blank"
    # the gallery file: a title strip over G rows of six 160 px panels, each row with its sentence line
    w, h = Image.open(run / "report/gallery.png").size
    assert w == 6 * 160 + 5 * 4 and h == 2 * 16 + 4 + G * (160 + 16 + 4)
    assert all(f"<th>{title}<br>" in page for title, _ in GALLERY_COLUMNS)
    # IoU column, hand-computed: a shift by 3 px of a 30x30 square -> 27*30 / (33*30) = 81.82 %
    assert "<td>81.82</td>" in page


def test_write_report_supervised_without_gallery(tmp_path):
    run = _make_run(tmp_path / "sup", rounds=0, gallery=False, method="supervised")
    page = Path(write_report(run)).read_text()
    assert "No semi-supervised rounds in this run (method supervised)" in page
    assert "No gallery in this run folder" in page
    assert "<td>41.23</td>" in page
    assert not (run / "report" / "curves.png").exists()


def test_write_report_without_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_report(tmp_path)


def test_report_cli(tmp_path, capsys):
    from l2l_ray.cli import main

    run = _make_run(tmp_path / "cli", rounds=1, gallery=False)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_tensorboard_logger_writes_flattened_scalars(tmp_path):
    assert scalar_items({"val": {"mIoU": np.float32(0.5), "n": 3}, "ok": True, "s": "x", "l": [1]}) == {
        "val/mIoU": 0.5, "val/n": 3.0, "ok": 1.0}
    with TBLogger(tmp_path) as tb:
        for r in (1, 2, 3):
            assert tb.log_round(r, _round(r)) == 12  # round + 2 val + 5 reward + 3 shares + seconds
        tb.log_splits({"val": _split(0.4, 0.5, 10)}, step=3)
    got = read_scalars(tmp_path / "tb")
    assert [s for s, _ in got["val/mIoU"]] == [1, 2, 3]
    assert np.allclose([v for _, v in got["reward/total"]], [0.6, 0.7, 0.8])
    assert np.isclose(got["final/val/oIoU"][0][1], 0.5)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = _make_run(tmp_path / "run")
    page = Path(write_report(run)).resolve()
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1800",
           f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.exists(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)  # (H, W, 3)
    assert img.shape[:2] == (1800, 1600)
    # rendered plots and gallery panels are coloured; a page of text or broken-image icons is grey
    chroma = img.max(axis=2) - img.min(axis=2)
    assert (chroma > 60).mean() > 0.01, "screenshot shows almost no colour: plots/gallery did not render"
    assert (img.sum(axis=2) < 600).mean() > 0.05, "screenshot is nearly blank"
    if os.environ.get("L2L_REPORT_EXAMPLE"):
        shutil.copyfile(shot, os.environ["L2L_REPORT_EXAMPLE"])


def test_write_report_rounds_without_reward_terms(tmp_path):
    """A mean_teacher run records val metrics and shares per round but no selector reward."""
    run = _make_run(tmp_path / "mt", rounds=2, gallery=False, method="mean_teacher")
    metrics = json.loads((run / "metrics.json").read_text())
    for r in metrics["rounds"]:
        del r["reward"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = Path(write_report(run)).read_text()
    assert page.count("Not recorded in metrics.json") == 1
    assert (run / "report" / "curves.png").exists() and not (run / "report" / "rewards.png").exists()


def test_val_curve_and_round_table_start_at_the_warmup(tmp_path, monkeypatch):
    run = _make_run(tmp_path / "run", rounds=3, gallery=False)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = round_rows(metrics)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[0]["val"] == WARMUP_VAL
    x, ys = report.line_series(rows, report.VAL_SERIES, 100.0)
    assert x.tolist() == [0, 1, 2, 3]
    assert np.allclose(ys["val mIoU"], [24.68, 35.0, 40.0, 45.0]) and np.isclose(ys["val oIoU"][0], 29.75)
    # the page's curve is drawn from those rows
    drawn = []
    monkeypatch.setattr(report, "plot_curves", lambda rows, real=report.plot_curves: drawn.append(rows) or real(rows))
    page = Path(write_report(run)).read_text()
    assert [r["round"] for r in drawn[0]] == [0, 1, 2, 3]
    # the per-round table: a row per round plus the warm-up; round 2 by hand from _round(2)
    table = round_table(rows)
    assert len(table) == 4 and table[0] == ["0 (warm-up)", "24.68", "29.75", "n/a", "n/a", "n/a", "n/a"]
    assert table[2] == ["2", "40.00", "43.00", "70.00", "30.00", "70.00", "0.700"]
    body = page.split("id='rounds'>", 1)[1].split("</table>", 1)[0]
    assert body.count("<tr>") == 1 + 4 and "<td>0 (warm-up)</td><td>24.68</td>" in body


def test_round_rows_without_a_warmup_record():
    """Older metrics.json files have no ``warmup_val``; a supervised run has no rounds: no round 0 then."""
    assert [r["round"] for r in round_rows({"rounds": [_round(1)]})] == [1]
    assert round_rows({"rounds": [], "warmup_val": None}) == []
    assert round_table(round_rows({"rounds": [{"round": 1, "val": {"mIoU": 0.5}}]})) == [
        ["1", "50.00", "n/a", "n/a", "n/a", "n/a", "n/a"]]


def test_gallery_grid_has_a_title_strip():
    """Above the first row of panels: dark title text on white, one title per column, over its column."""
    px = 96
    grid = np.asarray(Image.open(io.BytesIO(report.gallery_grid(_gallery_arrays(), px))).convert("L"))  # (H, W)
    strip, first_row = grid[:2 * 16 + 4], grid[2 * 16 + 4:2 * 16 + 4 + px]
    assert grid.shape == (2 * 16 + 4 + G * (px + 16 + 4), 6 * px + 5 * 4)
    assert len(GALLERY_COLUMNS) == 6 and (first_row < 250).mean() > 0.5  # the panels start below the strip
    for j in range(6):
        col = strip[:, j * (px + 4):j * (px + 4) + px]
        assert (col < 128).sum() > 20, f"no title over column {j}"
