"""The lines a run ends with: where its results are, whoever wrote them."""

from pathlib import Path

from nnxtrain.train.report import results


def test_results_lists_the_run_dir_folders_first_without_hidden_entries(tmp_path: Path) -> None:
    for name in ("metrics.jsonl", "a_plugin.txt", ".lock"):
        (tmp_path / name).write_text("")
    for name in ("tensorboard", "checkpoints", ".hydra"):
        (tmp_path / name).mkdir()
    assert results(str(tmp_path)) == (
        f"results in {tmp_path}:\n  checkpoints/  tensorboard/  a_plugin.txt  metrics.jsonl"
    )


def test_results_of_a_run_dir_that_is_gone_still_names_it(tmp_path: Path) -> None:
    assert results(str(tmp_path / "gone")) == f"results in {tmp_path / 'gone'}"
