"""The sweep summary's reader of a job's metrics.jsonl: one point per step, in step order,
whatever a kill or an older logger left in the file."""

import json

from nnxtrain.cli.sweep import _loss_curve


def test_loss_curve_skips_a_torn_line_and_keeps_the_last_record_of_a_step(tmp_path):
    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in (1, 2, 3)]
    lines.append(json.dumps({"step": 2, "eval/loss": 9.0}))  # an evaluation: no train loss
    lines.append('{"step": 4, "lo{"step": 3, "loss": 1.5}')  # torn, then appended to
    # A file from before resumes dropped the steps they redo: step 3 again, then step 4.
    lines += [json.dumps({"step": 3, "loss": 6.5}), json.dumps({"step": 4, "loss": 6.0})]
    lines.append('{"step": 5, "loss": 5.')  # the last line, torn by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert _loss_curve(str(tmp_path)) == ([1, 2, 3, 4], [9.0, 8.0, 6.5, 6.0])
    assert _loss_curve(str(tmp_path / "no_such_run")) == ([], [])
