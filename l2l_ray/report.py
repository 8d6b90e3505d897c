"""Run reports: one self-contained HTML page per run folder (``l2l report RUN_DIR``).

    l2l report runs/default          # -> runs/default/report.html (+ runs/default/report/*.png)

The page reads what the driver wrote into the run folder:
- ``metrics.json``: final split metrics, the warm-up's val metrics (``warmup_val``, shown as round 0),
  per-round val metrics, reward terms, trusted-pixel shares;
- ``gallery.npz``: a fixed sample of val pairs written by :func:`save_gallery` during the run;
- ``config.yaml``: the resolved config (shown verbatim).

Every picture is embedded in the HTML as base64 (the page opens offline, from anywhere, even
copied alone) and also written as a PNG under ``<run>/report/`` for slides and papers. matplotlib
(Agg backend) draws the curves; the gallery panels are drawn with PIL.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from l2l_ray.io import atomic_write, atomic_write_bytes, atomic_write_text, read_json

GALLERY_FILE = "gallery.npz"
REPORT_FILE = "report.html"
REPORT_DIR = "report"
_MASK_KEYS = ("proposals", "teacher", "pseudo", "pred", "truth")
PANEL_PX = 160  # side of one gallery panel in the page, pixels
# The gallery's columns in save_gallery's order (the image, then _MASK_KEYS): title and colour key, shown in the
# HTML table head and in the title strip of gallery.png. Each pair's sentence is printed under its row.
GALLERY_COLUMNS = (("image + prior box", "yellow box; sentence below"), ("prior proposal", "soft map, orange"),
                   ("teacher", "soft map, blue"), ("pseudo-label", "green=1, black=0, grey=ignored"),
                   ("prediction", "red"), ("truth", "teal"))
# The per-round table: title, dotted path in a round's record, scale ("%": x100, else 3 decimals).
ROUND_COLUMNS = (("val mIoU (%)", "val.mIoU", "%"), ("val oIoU (%)", "val.oIoU", "%"),
                 ("trusted pixels (%)", "trusted_pixel_share", "%"), ("rejected pairs (%)", "rejected_share", "%"),
                 ("pseudo-label IoU, diagnostic (%)", "pseudo_iou_diag", "%"), ("reward total", "reward.total", ""))


# ---------------------------------------------------------------------------------------------
# gallery.npz: written by the driver, read by the report


def save_gallery(run_dir: str | os.PathLike, images: np.ndarray, sentences: list[str], prior_boxes: np.ndarray,
                 proposals: np.ndarray, teacher: np.ndarray, pseudo: np.ndarray, pred: np.ndarray,
                 truth: np.ndarray) -> str:
    """Write ``<run_dir>/gallery.npz`` atomically and return its path.

    images: uint8 (G, S, S, 3) RGB; sentences: G strings; prior_boxes: float (G, 4) normalised
    xyxy in [0, 1], a row of NaN where the pair has no prior; proposals, teacher, pred, truth:
    uint8 (G, S, S), 0..255 (255 = foreground; soft maps keep their grey levels); pseudo: uint8
    (G, S, S), 255 = foreground, 0 = background, 128 = ignored (not trained on).
    """
    images = np.asarray(images)
    g = _check_array("images", images, np.uint8, 4)
    if images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"save_gallery: images has shape {images.shape}; expected (G, S, S, 3)")
    side = images.shape[1]
    if len(sentences) != g:
        raise ValueError(f"save_gallery: {len(sentences)} sentences for {g} images; need one per image")
    boxes = np.asarray(prior_boxes, dtype=np.float32)
    if boxes.shape != (g, 4):
        raise ValueError(f"save_gallery: prior_boxes has shape {boxes.shape}; expected ({g}, 4), NaN rows = no prior")
    arrays = {"images": images, "sentences": np.asarray([str(s) for s in sentences], dtype=str).reshape(g),
              "prior_boxes": boxes}
    for name, arr in zip(_MASK_KEYS, (proposals, teacher, pseudo, pred, truth), strict=True):
        arr = np.asarray(arr)
        _check_array(name, arr, np.uint8, 3)
        if arr.shape != (g, side, side):
            raise ValueError(f"save_gallery: {name} has shape {arr.shape}; expected ({g}, {side}, {side})")
        arrays[name] = arr
    path = Path(run_dir) / GALLERY_FILE

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(f, **arrays)

    atomic_write(path, _write)
    return str(path)


def _check_array(name: str, arr: np.ndarray, dtype: type, ndim: int) -> int:
    if arr.dtype != dtype or arr.ndim != ndim:
        raise ValueError(f"save_gallery: {name} is {arr.dtype} with {arr.ndim} dims; expected {np.dtype(dtype)} "
                         f"with {ndim} dims")
    return arr.shape[0]


def load_gallery(run_dir: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The arrays of ``<run_dir>/gallery.npz`` (keys as in :func:`save_gallery`), or None if absent."""
    path = Path(run_dir) / GALLERY_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# the page


def write_report(run_dir: str | os.PathLike) -> str:
    """Write ``<run_dir>/report.html`` (self-contained) and ``<run_dir>/report/*.png``; return the HTML path.

    Copes with a supervised run (no rounds) and a run without ``gallery.npz``: the page says what is missing.
    """
    run = Path(run_dir)
    metrics = read_json(run / "metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"{run / 'metrics.json'}: no metrics in this run folder; run `l2l train --config ... "
                                f"run.dir={run}` first (or pass the right run folder)")
    png_dir = run / REPORT_DIR
    sections = [_summary_section(run, metrics), _splits_section(metrics.get("splits") or {})]
    sections.append(_rounds_section(metrics, png_dir))
    sections.append(_gallery_section(load_gallery(run), png_dir))
    sections.append(_timing_section(metrics.get("timing") or {}))
    config = run / "config.yaml"
    if config.exists():
        sections.append(f"<h2>Resolved config</h2><details><summary>config.yaml</summary><pre>"
                        f"{html.escape(config.read_text())}</pre></details>")
    page = _PAGE.format(title=html.escape(f"l2l report: {run.resolve().name}"), body="\n".join(sections))
    out = run / REPORT_FILE
    atomic_write_text(out, page)
    return str(out)


def _summary_section(run: Path, metrics: dict[str, Any]) -> str:
    val = (metrics.get("splits") or {}).get("val") or {}
    rows = [("run folder", str(run.resolve())), ("method", metrics.get("method", "?")),
            ("label ratio", metrics.get("label_ratio", "?")), ("rounds", len(metrics.get("rounds") or [])),
            ("val mIoU (%)", _pct(val.get("mIoU"))), ("val oIoU (%)", _pct(val.get("oIoU")))]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h1>L2L run report</h1><table class='kv'>{cells}</table>"


def _pct(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or math.isnan(v) else f"{100 * v:.2f}"


def _splits_section(splits: dict[str, dict[str, Any]]) -> str:
    """Final metrics per split: IoUs and precisions in percent, ``n`` = number of (ref, sentence) pairs."""
    if not splits:
        return ("<h2>Final metrics</h2><p class='missing'>No split metrics in metrics.json "
                "(the run did not evaluate).</p>")
    cols = [c for c in ("mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")
            if any(c in m for m in splits.values())]
    extra = sorted({k for m in splits.values() for k in m} - set(cols) - {"n"})
    head = "".join(f"<th>{html.escape(c)} (%)</th>" for c in cols) + "".join(f"<th>{html.escape(c)}</th>"
                                                                            for c in extra)
    body = []
    for name, m in splits.items():
        cells = "".join(f"<td>{_pct(m.get(c))}</td>" for c in cols)
        cells += "".join(f"<td>{html.escape(str(m.get(c, '')))}</td>" for c in extra)
        body.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>{m.get('n', '')}</td></tr>")
    return (f"<h2>Final metrics</h2><table class='metrics' id='metrics'><tr><th>split</th>{head}<th>n</th></tr>"
            + "".join(body) + "</table>")


def round_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """``metrics["rounds"]`` preceded by round 0, the warm-up (``{"round": 0, "val": metrics["warmup_val"]}``),
    where the run has rounds and recorded the warm-up's val metrics."""
    rounds = list(metrics.get("rounds") or [])
    warm = metrics.get("warmup_val")
    return ([{"round": 0, "val": warm}] if rounds and isinstance(warm, dict) else []) + rounds


def round_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Cells of the per-round table: per row of :func:`round_rows`, its round then one cell per ROUND_COLUMNS
    entry ("n/a" where the round lacks it: the warm-up has no selection, a mean_teacher run no reward)."""
    table = []
    for i, r in enumerate(rows):
        n = r.get("round", i)
        cells = [f"{n} (warm-up)" if n == 0 else str(n)]
        for _, path, scale in ROUND_COLUMNS:
            v = float(_series([r], path)[0])
            cells.append(_pct(v) if scale == "%" else "n/a" if math.isnan(v) else f"{v:.3f}")
        table.append(cells)
    return table


def _rounds_section(metrics: dict[str, Any], png_dir: Path) -> str:
    rounds, rows = metrics.get("rounds") or [], round_rows(metrics)
    if not rounds:
        return (f"<h2>Rounds</h2><p class='missing'>No semi-supervised rounds in this run (method "
                f"{html.escape(str(metrics.get('method', '?')))}): no per-round curves.</p>")
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["round", *(c[0] for c in ROUND_COLUMNS)])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in round_table(rows))
    table = (f"<table class='metrics' id='rounds'><tr>{head}</tr>{body}</table>"
             "<p>Round 0 is the warm-up on the labelled pairs alone. Trusted pixels: share of the unlabelled "
             "pairs' pixels trained on; rejected pairs: share of pairs left out; the pseudo-labels' IoU with the "
             "hidden truth is a diagnostic, never a training signal.</p>")
    figs = [("curves", "Validation metrics per round (0 = warm-up)", plot_curves(rows)),
            ("rewards", "Reward terms per round (selector)", plot_rewards(rounds)),
            ("shares", "Pseudo-label pixels per round", plot_shares(rounds))]
    parts = []
    for name, title, png in figs:
        body = ("<p class='missing'>Not recorded in metrics.json for this run.</p>" if png is None
                else _figure(png_dir, f"{name}.png", png, title))
        parts.append(f"<div><h3>{title}</h3>{body}</div>")
    return "<h2>Rounds</h2>" + table + "<div class='figs'>" + "\n".join(parts) + "</div>"


def _figure(png_dir: Path, name: str, png: bytes, alt: str) -> str:
    """Write ``png_dir/name`` and return an ``<img>`` that embeds the same bytes (plus a link to the file)."""
    atomic_write_bytes(png_dir / name, png)
    return (f"<figure><img alt='{html.escape(alt)}' src='{_data_uri(png)}'>"
            f"<figcaption><a href='{REPORT_DIR}/{name}'>{REPORT_DIR}/{name}</a></figcaption></figure>")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _gallery_section(gallery: dict[str, np.ndarray] | None, png_dir: Path) -> str:
    if gallery is None:
        return (f"<h2>Gallery</h2><p class='missing'>No gallery in this run folder ({GALLERY_FILE} is missing: "
                f"the driver writes it with l2l_ray.report.save_gallery).</p>")
    titles = [title for title, _ in GALLERY_COLUMNS]
    rows = []
    for i, panels in enumerate(gallery_panels(gallery, PANEL_PX)):
        pred, truth = gallery["pred"][i] >= 128, gallery["truth"][i] >= 128
        union = np.logical_or(pred, truth).sum()
        iou = np.logical_and(pred, truth).sum() / union if union else float("nan")
        imgs = "".join(f"<td><img alt='{h}' src='{_data_uri(p)}'></td>" for h, p in zip(titles, panels, strict=True))
        rows.append(f"<tr><td class='sent'>{html.escape(str(gallery['sentences'][i]))}</td>{imgs}"
                    f"<td>{_pct(iou)}</td></tr>")
    atomic_write_bytes(png_dir / "gallery.png", gallery_grid(gallery, PANEL_PX))
    legend = ("pseudo-label: green = trusted foreground, black = trusted background, grey = ignored; "
              "prior box in yellow; IoU = prediction vs truth (%)")
    heads = ["<th>sentence</th>", *(f"<th>{html.escape(t)}<br><small>{html.escape(k)}</small></th>"
                                    for t, k in GALLERY_COLUMNS), "<th>IoU</th>"]
    return (f"<h2>Gallery (fixed val sample, {len(rows)} pairs)</h2><p>{legend}. "
            f"All panels in one file: <a href='{REPORT_DIR}/gallery.png'>{REPORT_DIR}/gallery.png</a></p>"
            f"<table class='gallery' id='gallery'><tr>{''.join(heads)}</tr>"
            + "".join(rows) + "</table>")


def _timing_section(timing: dict[str, Any]) -> str:
    if not timing:
        return ""
    flat = flatten(timing)
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.3f}</td></tr>" if isinstance(v, float)
                    else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in flat.items())
    return f"<h2>Timing</h2><table class='kv'>{cells}</table>"


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a/b": 1, "c": 2}`` (lists and other leaves kept as they are)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# figures: matplotlib Figure objects on the Agg canvas (no pyplot, no global backend switch)


def _series(rounds: list[dict[str, Any]], path: str) -> np.ndarray:
    """Per-round values of a dotted path (``"val.mIoU"``), NaN where a round lacks it."""
    out = []
    for r in rounds:
        v: Any = r
        for part in path.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan"))
    return np.asarray(out, dtype=np.float64)


def line_series(rounds: list[dict[str, Any]], series: list[tuple[str, str]],
                scale: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The points a chart draws: x = round numbers (R,), and per (dotted path, label) with any value, y (R,)
    times ``scale``, NaN where a round lacks it."""
    x = np.asarray([r.get("round", i) for i, r in enumerate(rounds)], dtype=np.float64)
    ys = {label: _series(rounds, path) * scale for path, label in series}
    return x, {label: y for label, y in ys.items() if np.isfinite(y).any()}


def _line_plot(rounds: list[dict[str, Any]], series: list[tuple[str, str]], ylabel: str, scale: float,
               xlabel: str = "round") -> bytes | None:
    """One axes, one line per (dotted path, label) that has any value; None when none has."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, ys = line_series(rounds, series, scale)
    if not ys:
        return None
    fig = Figure(figsize=(4.8, 3.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, y in ys.items():
        ax.plot(x, y, marker="o", label=label, linewidth=2.5 if label == "total" else 1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return png_bytes(fig)


VAL_SERIES = [("val.mIoU", "val mIoU"), ("val.oIoU", "val oIoU")]


def plot_curves(rounds: list[dict[str, Any]]) -> bytes | None:
    """Val mIoU and oIoU (%) per round, as PNG bytes; pass :func:`round_rows` so the curve starts at the warm-up."""
    return _line_plot(rounds, VAL_SERIES, "IoU (%)", 100.0, xlabel="round (0 = warm-up)")


def plot_rewards(rounds: list[dict[str, Any]]) -> bytes | None:
    """Every reward term recorded under ``round["reward"]`` (mean per round), as PNG bytes."""
    keys: list[str] = []
    for r in rounds:
        keys += [k for k in (r.get("reward") or {}) if k not in keys]
    return _line_plot(rounds, [(f"reward.{k}", k) for k in keys], "mean reward", 1.0)


def plot_shares(rounds: list[dict[str, Any]]) -> bytes | None:
    """Share of unlabeled pixels trusted and of pairs rejected by the selection; pseudo-label IoU with truth (%)."""
    return _line_plot(rounds, [("trusted_pixel_share", "trusted pixels"), ("rejected_share", "rejected pairs"),
                               ("pseudo_iou_diag", "pseudo-label IoU (diagnostic)")], "%", 100.0)


def png_bytes(fig: Any) -> bytes:
    """Render a matplotlib figure (on an Agg canvas) to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# gallery panels (PIL): image + prior box, then five masks tinted over the dimmed image

_TINTS = {"proposals": (255, 140, 0), "teacher": (60, 120, 255), "pred": (230, 40, 40), "truth": (0, 200, 170)}


def gallery_panels(gallery: dict[str, np.ndarray], px: int) -> list[list[bytes]]:
    """Per pair, six PNGs of side ``px``: image + prior box, proposal, teacher, pseudo-label, prediction, truth."""
    return [[_png(p) for p in _row_images(gallery, i, px)] for i in range(len(gallery["images"]))]


def gallery_grid(gallery: dict[str, np.ndarray], px: int) -> bytes:
    """All panels in one PNG: a title strip naming the columns (GALLERY_COLUMNS), then a row per pair, its
    sentence under the row."""
    from PIL import Image, ImageDraw

    gap, text_h, g = 4, 16, len(gallery["images"])
    head = 2 * text_h + gap  # title and colour key, one line each
    grid = Image.new("RGB", (6 * px + 5 * gap, head + g * (px + text_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, (title, key) in enumerate(GALLERY_COLUMNS):  # centred over the column (textlength: any PIL font)
        cx = j * (px + gap) + px / 2
        draw.text((cx - draw.textlength(title) / 2, 2), title, fill=(0, 0, 0))
        draw.text((cx - draw.textlength(key) / 2, text_h + 1), key, fill=(90, 90, 90))
    for i in range(g):
        y = head + i * (px + text_h + gap)
        for j, panel in enumerate(_row_images(gallery, i, px)):
            grid.paste(panel, (j * (px + gap), y))
        sentence = str(gallery["sentences"][i])
        draw.text((2, y + px + 2), sentence if len(sentence) <= 110 else sentence[:107] + "...", fill=(0, 0, 0))
    return _png(grid)


def _row_images(gallery: dict[str, np.ndarray], i: int, px: int) -> list[Any]:
    from PIL import Image, ImageDraw

    img = Image.fromarray(gallery["images"][i]).resize((px, px), Image.BILINEAR)
    dim = np.asarray(img, dtype=np.float32) * 0.35  # (px, px, 3)
    boxed = img.copy()
    box = gallery["prior_boxes"][i]
    if np.isfinite(box).all():
        x1, y1, x2, y2 = (float(np.clip(v, 0.0, 1.0)) * (px - 1) for v in box)
        ImageDraw.Draw(boxed).rectangle([x1, y1, x2, y2], outline=(255, 230, 0), width=2)
    out = [boxed]
    for key in _MASK_KEYS:
        m = np.asarray(Image.fromarray(gallery[key][i]).resize((px, px), Image.NEAREST))  # (px, px) uint8
        out.append(Image.fromarray(_pseudo_rgb(m) if key == "pseudo" else _tint(dim, m, _TINTS[key])))
    return out


def _tint(dim: np.ndarray, m: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Blend ``color`` over the dimmed image with alpha = m / 255 (soft maps keep their grey levels)."""
    a = (m.astype(np.float32) / 255.0)[..., None] * 0.9  # (px, px, 1)
    return (dim * (1 - a) + np.asarray(color, np.float32) * a).clip(0, 255).astype(np.uint8)


def _pseudo_rgb(m: np.ndarray) -> np.ndarray:
    """255 -> green (trusted fg), 0 -> black (trusted bg), anything else (128) -> grey (ignored)."""
    rgb = np.full(m.shape + (3,), 128, np.uint8)
    rgb[m == 255] = (40, 200, 60)
    rgb[m == 0] = (0, 0, 0)
    return rgb


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
table.kv th, th:first-child {{ text-align: left; }}
table.gallery td {{ padding: 2px; vertical-align: middle; }}
td.sent {{ max-width: 14em; text-align: left; font-size: 0.9em; }}
p.missing {{ color: #a40; font-style: italic; }}
div.figs {{ display: flex; flex-wrap: wrap; gap: 0 1.5em; }}
table.gallery th {{ text-align: center; }}
figure {{ margin: 0.5em 0; }} figcaption {{ font-size: 0.8em; color: #666; }}
</style></head>
<body>
{body}
</body></html>
"""
