"""cluster/: the Ray cluster-launcher YAML (Ray's own schema check), the KubeRay RayJob manifest, the
runtime env of `ray job submit`, the download script, and every `key=value` override written in them
and in docs/cluster.md (checked against l2l_ray.config, so the docs cannot drift from the config)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import ray
import yaml

from l2l_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAYJOB_SPEC_FIELDS = {  # KubeRay ray.io/v1 RayJobSpec
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=\S*$")


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_launcher_yaml_passes_rays_schema_check():
    cfg = _prepared(_launcher())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = {name: t["resources"] for name, t in types.items() if t["resources"].get("GPU")}
    assert gpu["gpu_prior"]["accelerator_type:L4"] == 1 and gpu["gpu_prior"]["GPU"] == 4
    assert gpu["gpu_train"]["accelerator_type:A100"] == 1 and gpu["gpu_train"]["GPU"] == 8
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert ray.__version__ in cfg["docker"]["image"]  # the cluster runs the Ray the client runs
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])


@pytest.mark.parametrize("breaks, error", [
    (lambda c: c.__setitem__("max_worker", 3), "'max_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_train"].__setitem__("resources", "GPU=8"), "is not of type 'object'"),
    (lambda c: c.__setitem__("head_node_type", "nohead"), "must be one of `available_node_types`"),
    (lambda c: c["available_node_types"]["gpu_train"].__setitem__("min_workers", 9), "smaller than the sum"),
])
def test_schema_check_rejects_broken_launcher_configs(breaks, error):
    cfg = _launcher()
    breaks(cfg)
    with pytest.raises(Exception, match=re.escape(error)):
        _prepared(cfg)


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def test_kuberay_rayjob_manifest_structure(tmp_path):
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"gpu-prior", "gpu-train"} <= set(groups)
    images = set()
    for group in [head, *groups.values()]:
        # KubeRay's rayStartParams is map[string]string: a bare YAML number or bool is rejected
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        vols = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
        assert mounts <= vols, f"volumeMounts without a volume: {mounts - vols}"
    assert len(images) == 1  # one image everywhere: same Ray, same code
    for name, accel, gpus in (("gpu-prior", "L4", 1), ("gpu-train", "A100", 8)):
        g = groups[name]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))  # '"{...}"': a quoted JSON string
        assert custom == {f"accelerator_type:{accel}": 1}
    # the runtime env is one Ray accepts (its working_dir lives in the image; validate with a real folder)
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**{**env, "working_dir": str(tmp_path)})
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_runtime_env_file_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # `ray job submit` resolves working_dir from the repository root
        RuntimeEnv(**env)
    finally:
        os.chdir(cwd)
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string env values


def _rayjob_overrides() -> list[str]:
    entry = _rayjob()["spec"]["entrypoint"]
    (value,) = re.findall(r'O="([^"]*)"', entry)
    assert re.search(r'C="--config (\S+)"', entry).group(1) == "configs/refcoco_1pct.yaml"
    return value.split()


def _docs_overrides() -> list[list[str]]:
    """key=value words of every `l2l ...` / `python -m l2l_ray ...` command in docs/cluster.md."""
    text = (REPO / "docs" / "cluster.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            words = shlex.split(cmd, comments=True)
            if "l2l_ray" in words or (words and words[0] == "l2l"):
                commands.append([w for w in words if OVERRIDE.match(w) and "$" not in w])
    return commands


def test_overrides_in_manifests_and_docs_are_config_keys():
    base = REPO / "configs" / "refcoco_1pct.yaml"
    config = str(base) if base.exists() else None  # written by the segmenter work; defaults until then
    cfg = load_config(config, _rayjob_overrides())
    assert cfg.priors.backend == "vllm" and cfg.train.use_gpu and cfg.train.num_workers == 8
    docs = _docs_overrides()
    assert len(docs) >= 4, "docs/cluster.md should show the priors, train, eval and tune/report commands"
    for words in docs:
        load_config(config, words)  # raises ConfigError naming the bad key


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "curl", "unzip")), reason="needs bash, curl, unzip")
def test_fetch_script_builds_the_refer_layout(tmp_path, refer_fixture_root):
    """cluster/fetch_refcoco.sh on file:// mirrors made from the genuine REFER records (stand-in images)."""
    from PIL import Image

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "refcoco.zip", "w") as z:
        for f in ("instances.json", "refs(unc).p"):
            z.write(Path(refer_fixture_root) / "refcoco" / f, f"refcoco/{f}")
    images = json.loads((Path(refer_fixture_root) / "refcoco" / "instances.json").read_text())["images"]
    with zipfile.ZipFile(mirror / "train2014.zip", "w") as z:
        for im in images:
            img = tmp_path / im["file_name"]
            Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(img)
            z.write(img, f"train2014/{im['file_name']}")
    root = tmp_path / "refer"
    env = {**os.environ, "REFER_BASE_URL": mirror.as_uri(), "COCO_URL": (mirror / "train2014.zip").as_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = [str(CLUSTER / "fetch_refcoco.sh"), str(root), "refcoco"]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads((root / "refcoco" / "stats_unc.json").read_text())
    assert stats["refs"] == 8 and stats["sentences"] == 23  # the fixture's README counts
    assert stats["image_files_found"] == stats["images"] == 4
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)  # resumable: skips
    assert again.returncode == 0 and "refcoco: present" in again.stdout
