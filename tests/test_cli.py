"""The CLI's outer error handling: user errors (also wrapped by Ray) print one line and exit 2;
Ctrl-C prints how to resume and exits 130; a bug keeps its traceback."""

from __future__ import annotations

import pytest

from l2l_ray import cli
from l2l_ray.errors import DataError, UserError


def _raising(exc: BaseException):
    def dispatch(args):
        raise exc

    return dispatch


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_dispatch", _raising(KeyboardInterrupt()))
    run_dir = str(tmp_path / "run")
    assert cli.main(["train", f"run.dir={run_dir}", "method=supervised"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "run the same command again (l2l train run.dir=" in err and f"last checkpoint in {run_dir}" in err
    assert cli.main(["train", f"run.dir={run_dir}", "run.resume=false"]) == 130
    assert "run.resume=false run.resume=true)" in capsys.readouterr().err
    assert cli.main(["experiment", f"run.dir={run_dir}"]) == 130
    assert "not run again" in capsys.readouterr().err


def test_user_errors_print_the_message_alone(monkeypatch, capsys):
    try:
        raise DataError("refs(umd).p is not a readable REFER refs pickle; re-download it") from OSError("deep")
    except DataError as e:
        inner = e
    monkeypatch.setattr(cli, "_dispatch", _raising(inner))
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == f"l2l: error: {inner}\n"


def test_errors_wrapped_by_ray_are_unwrapped():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    cause = UserError("data.image_dir: no such folder")
    task = RayTaskError("load", "Traceback (most recent call last):\n ...", cause).as_instanceof_cause()
    assert cli.user_error(task) is cause
    assert cli.user_error(WorkerGroupError("rank 0 failed", {0: task})) is cause
    assert cli.user_error(RayTaskError("f", "tb", ZeroDivisionError())) is None


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_dispatch", _raising(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["train"])
