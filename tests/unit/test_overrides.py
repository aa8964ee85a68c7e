"""The command line's one-line errors, in-process: `check_command_line` before Hydra runs,
and `explain` on what Hydra raises while composing (tests/integration/test_cli_errors.py
runs the real CLI on one case of each kind)."""

import errno

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from nnxtrain import compose
from nnxtrain.cli.overrides import check_command_line, explain
from nnxtrain.errors import ConfigError, UserError, log_traceback, unknown_key


def composition_error(overrides: list[str]) -> Exception:
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        compose(overrides)
    return err.value


# override -> (the key the error names, text its line must hold). Each one was Hydra's
# multi-line report and exit 1 from the CLI.
COMPOSITION = {
    "callbacks.checkpoint.evry=5": (
        "callbacks.checkpoint.evry",
        "use callbacks.checkpoint.every, the closest key, or add it with "
        "+callbacks.checkpoint.evry=5",
    ),
    "callbacks.checkpoint.xyzzy=5": ("callbacks.checkpoint.xyzzy", "use one of callbacks."),
    "callbacks.nope.every=5": ("callbacks.nope", "add one with +callbacks.nope._target_="),
    "mesh.rules.embed=fsdp": ("mesh.rules.embed", "add it with +mesh.rules.embed=fsdp"),
    "~run.steps": ("run.steps", "cannot be deleted"),
    "hydra.job.chdr=true": ("hydra.job.chdr", "use hydra.job.chdir, the closest key"),
    "hydra.job.chdir=abc": ("hydra.job.chdir", "not a valid bool"),
}


@pytest.mark.parametrize("override", list(COMPOSITION))
def test_a_composition_error_is_one_line_naming_the_key(override):
    key, text = COMPOSITION[override]
    error = explain(composition_error([override]))
    assert isinstance(error, ConfigError) and error.key == key
    assert text in str(error) and "Fix:" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("+run.steps=3", "An item is already at 'run.steps'"),
        ("hydra/launcher=nope", "Could not find 'hydra/launcher/nope' (available: basic"),
        ("callbacks.checkpoint.every=5,6", "Ambiguous value"),
    ],
)
def test_other_hydra_errors_are_one_line_too(override, text):
    error = explain(composition_error([override]))
    assert isinstance(error, UserError)
    assert text in str(error) and "Fix:" in str(error)
    assert "\n" not in str(error)


def test_an_output_dir_that_cannot_be_created_names_hydra_run_dir():
    oserror = FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/x")
    assert str(explain(oserror)).startswith("hydra.run.dir: cannot create /proc/x")
    assert str(explain(oserror, multirun=True)).startswith("hydra.sweep.dir: ")


def test_anything_else_is_not_bad_input():
    assert explain(RuntimeError("a bug")) is None


@pytest.mark.parametrize(
    ("args", "key", "text"),
    [
        (["run.steps=[1"], "run.steps", "cannot parse 'run.steps=[1'"),
        (["mesh.rules.embed=[x"], "mesh.rules.embed", "cannot parse"),
        (["model=tiny", "-m", "run.steps=2,3"], "command line", "put Hydra's flags"),
        (["--cfg", "nope"], "command line", "invalid choice"),
        (["model.rope_thta=1"], "model.rope_thta", "use model.rope_theta, the closest key"),
    ],
)
def test_the_command_line_is_checked_before_hydra_runs(args, key, text):
    with pytest.raises(UserError) as err:
        check_command_line(args)
    assert str(err.value).startswith(f"{key}: ") and text in str(err.value)
    assert "\n" not in str(err.value)


def test_a_good_command_line_passes():
    check_command_line(["-m", "model=tiny", "optim.lr=1e-3,3e-4", "+callbacks.x.y=1"])


def test_unknown_key_lists_the_keys_when_none_is_close():
    error = unknown_key("run.zzz", ["steps", "seed"])
    assert str(error) == "run.zzz: no such key. Fix: use one of run.{steps, seed}."


def test_log_traceback_appends_under_a_header(tmp_path):
    for message in ("first", "second"):
        try:
            raise ValueError(message)
        except ValueError as e:
            path = log_traceback(str(tmp_path), e, f"context {message}")
    assert path == str(tmp_path / "errors.log")
    text = (tmp_path / "errors.log").read_text()
    assert text.count("=== ") == 2 and "context first" in text and "context second" in text
    assert text.count("Traceback (most recent call last)") == 2
    assert "ValueError: second" in text
    assert log_traceback(str(tmp_path / "missing"), ValueError("x"), "c") is None
