"""Layering: the lower layers (data, model, selection, priors, records, config, errors) never import the
command line, the driver or the orchestration above them; RLlib is used through its current API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "l2l_ray"
LOWER = ["data", "model", "selection", "priors", "records.py", "config.py", "errors.py"]
UPPER = ("cli", "commands", "driver", "train", "tune", "experiment")


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)


@pytest.mark.parametrize("module", ["l2l_ray.data", "l2l_ray.model", "l2l_ray.selection.rules"])
def test_lower_layer_imports_no_cli_or_driver(module):
    p = _fresh(f"import sys, {module}\n"
               "print(sorted(m for m in sys.modules if m.startswith(('l2l_ray.cli', 'l2l_ray.driver'))))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"importing {module} imports {p.stdout.strip()}"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function-level ones included."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [(node.lineno, base)]
            if base == "l2l_ray":  # from l2l_ray import driver
                out += [(node.lineno, f"l2l_ray.{a.name}") for a in node.names]
    return out


def test_lower_layers_have_no_upward_imports():
    files = [f for name in LOWER for f in ([PACKAGE / name] if name.endswith(".py")
                                           else sorted((PACKAGE / name).rglob("*.py")))]
    assert len(files) > 10
    bad = [f"{f.relative_to(PACKAGE.parent)}:{line} imports {mod}"
           for f in files for line, mod in _imported_modules(f)
           if mod.split(".")[0] == "l2l_ray" and len(mod.split(".")) > 1 and mod.split(".")[1] in UPPER]
    assert not bad, "lower layers must not import " + ", ".join(UPPER) + ":\n" + "\n".join(bad)


def test_errors_are_shared_by_every_layer():
    from l2l_ray.config import ConfigError as FromConfig
    from l2l_ray.data import DataError as FromData
    from l2l_ray.data.images import ImageError
    from l2l_ray.errors import USER_ERRORS, ConfigError, DataError, UserError

    assert FromData is DataError and FromConfig is ConfigError
    assert issubclass(DataError, UserError) and issubclass(ImageError, DataError)
    assert {UserError, ConfigError} <= set(USER_ERRORS)


def test_selection_policy_uses_no_deprecated_rllib_module():
    """RLlib logs (not warns) "ray.rllib.models.torch.torch_distributions ... has been deprecated" when the
    old module is imported; build the policy and its action distribution in a fresh interpreter.
    (Ray 2.60's own ``RLModule.__init__`` still logs an ``RLModuleConfig`` deprecation: not ours.)"""
    p = _fresh("import sys, warnings\n"
               "warnings.simplefilter('error', DeprecationWarning)\n"
               "from l2l_ray.selection.agent import Selector\n"
               "from l2l_ray.selection.policy import policy_spec\n"
               "m = policy_spec(16, stride=4, hidden=8).build()\n"
               "m.get_inference_action_dist_cls(); m.get_exploration_action_dist_cls()\n"
               "print('ray.rllib.models.torch.torch_distributions' in sys.modules)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"
    assert "torch_distributions" not in p.stderr, p.stderr
