"""`l2l data stats` / `l2l data synth` end to end through the CLI (subprocess, as a user runs them)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# the fixture README's table: refs, sentences and splits per refs file
EXPECTED = {
    ("refcoco", "unc"): (8, 23, ["train", "val", "testA", "testB"]),
    ("refcoco", "google"): (6, 17, ["train", "val", "test"]),
    ("refcoco+", "unc"): (8, 25, ["train", "val", "testA", "testB"]),
    ("refcocog", "umd"): (6, 12, ["train", "val", "test"]),
    ("refcocog", "google"): (4, 8, ["train", "val"]),
}


def l2l(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l2l_ray", *args], capture_output=True, text=True, timeout=timeout)


def test_stats_on_all_real_fixture_files(refer_fixture_root):
    for (dataset, split_by), (refs, sents, splits) in EXPECTED.items():
        p = l2l("data", "stats", "--root", refer_fixture_root, "--dataset", dataset, "--split-by", split_by)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert (out["refs"], out["sentences"], list(out["splits"])) == (refs, sents, splits), (dataset, split_by)
        assert sum(s["refs"] for s in out["splits"].values()) == refs
        assert out["skipped"] == {} and out["image_files_found"] is None  # no images shipped
        assert out["num_categories"] == len(out["categories"]) > 0


def test_stats_counts_image_files(refer_fixture_root, tmp_path):
    from PIL import Image

    images = json.loads((Path(refer_fixture_root) / "refcocog" / "instances.json").read_text())["images"]
    for im in images[1:]:  # leave one out
        Image.new("RGB", (im["width"], im["height"])).save(tmp_path / im["file_name"])
    p = l2l("data", "stats", "--root", refer_fixture_root, "--dataset", "refcocog", "--split-by", "umd",
            "--image-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["image_files_found"] == len(images) - 1


def test_stats_errors_exit_2_without_traceback(tmp_path, refer_fixture_root):
    cases = [
        (["--root", str(tmp_path / "nowhere"), "--dataset", "refcoco", "--split-by", "unc"], "no such folder"),
        (["--root", str(tmp_path), "--dataset", "refcoco", "--split-by", "unc"], "download"),
        (["--root", refer_fixture_root, "--dataset", "refcocog", "--split-by", "unc"], "refcocog/umd"),
        (["--root", refer_fixture_root, "--dataset", "refcoco", "--split-by", "unc", "--image-dir",
          str(tmp_path / "no_images")], "--image-dir"),
    ]
    for args, message in cases:
        p = l2l("data", "stats", *args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith("l2l: error: ") and message in p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("l2l_ray.data.synth") is None,
                    reason="l2l_ray/data/synth.py (the synthetic generator) is not in the tree yet")
def test_synth_then_stats(tmp_path):
    p = l2l("data", "synth", "--out", str(tmp_path), "--images", "40", "--seed", "0")
    assert p.returncode == 0, p.stderr
    written = json.loads(p.stdout)
    assert written["stats"]["images"] == 40
    p = l2l("data", "stats", "--root", str(tmp_path), "--dataset", "synthref", "--split-by", "unc")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out["splits"]) == ["train", "val", "testA", "testB"]
    assert out["images"] == 40 and out["image_files_found"] == 40 and out["skipped"] == {}
    assert all(s["refs"] > 0 and s["sentences"] >= s["refs"] for s in out["splits"].values())
    assert out == written["stats"] | {"image_files_found": 40, "image_dir": out["image_dir"]}
    bad = l2l("data", "synth", "--out", str(tmp_path), "--images", "0")
    assert bad.returncode == 2 and "--images 0" in bad.stderr and "Traceback" not in bad.stderr


def _write_images(refer_fixture_root: str, folder: Path) -> list[str]:
    """Every refcocog fixture image as a small JPEG in ``folder``; returns the file names."""
    from PIL import Image

    images = json.loads((Path(refer_fixture_root) / "refcocog" / "instances.json").read_text())["images"]
    for im in images:
        Image.new("RGB", (64, 48), (120, 30, 200)).save(folder / im["file_name"], quality=90)
    return [im["file_name"] for im in images]


def test_check_images_names_corrupt_files(refer_fixture_root, tmp_path):
    names = _write_images(refer_fixture_root, tmp_path)
    stats = ["data", "stats", "--root", refer_fixture_root, "--dataset", "refcocog", "--split-by", "umd",
             "--image-dir", str(tmp_path), "--check-images"]
    p = l2l(*stats)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["bad_images"] == [] and p.stderr == ""

    truncated, text = tmp_path / names[0], tmp_path / names[-1]
    truncated.write_bytes(truncated.read_bytes()[:300])  # a download cut short
    text.write_text("<html>404 not found</html>")  # an error page saved under the image's name
    p = l2l(*stats)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"l2l: error: 2 of {len(names)} images of refcocog are unreadable")
    assert str(truncated) in p.stderr and str(text) in p.stderr and "corrupt" in p.stderr
    assert "re-download" in p.stderr  # what to do
    bad = json.loads(p.stdout)["bad_images"]
    assert sorted(b["path"] for b in bad) == sorted([str(truncated), str(text)])


def test_check_images_function(refer_fixture_root, tmp_path):
    """``check_images`` itself (what the driver calls before training): a ReferDataset or paths in,
    [(path, reason)] out, nothing raised."""
    from l2l_ray.data.check import check_images, image_paths
    from l2l_ray.data.refer import ReferDataset

    names = _write_images(refer_fixture_root, tmp_path)
    ds = ReferDataset(refer_fixture_root, "refcocog", "umd", str(tmp_path))
    assert check_images(ds) == [] and len(image_paths(ds)) <= len(names)
    used = image_paths(ds)[0]
    Path(used).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    [(path, reason)] = check_images(ds, threads=2)
    assert path == used and reason.startswith("corrupt or not an image")
    missing = str(tmp_path / "gone.jpg")
    assert check_images([missing, used, missing]) == [(missing, "not found"), (used, reason)]
