"""The jaxrnn command line, end to end on tiny sizes, and its messages for bad input."""

import json
import os
import subprocess
import sys

import pytest

from jaxrnn import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxrnn", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_checkpoint_and_resume_end_to_end(tmp_path):
    ckpt, metrics, summary = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "s.json"
    common = [
        "train",
        "--task",
        "adding",
        "--cell",
        "elman",
        "--seq-len",
        "6",
        "--hidden-size",
        "4",
        "--batch-size",
        "4",
        "--eval-size",
        "8",
        "--checkpoint-dir",
        str(ckpt),
        "--metrics",
        str(metrics),
        "--json",
        str(summary),
    ]
    first = _run(*common, "--steps", "4", "--loss-plot", str(tmp_path / "loss.png"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "test mse" in first.stdout and "vs baseline 0.1667" in first.stdout
    assert "4/4" in first.stderr  # the progress bar, with its rate and the loss
    assert ("step/s" in first.stderr or "s/step" in first.stderr) and "loss=" in first.stderr
    assert os.listdir(ckpt) == ["checkpoint_000000004.msgpack"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    second = _run(*common, "--steps", "6", "--resume", "--no-progress")
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(summary.read_text())
    assert result["steps"] == 6 and result["resumed_from"] == 4
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(steps) == 6

    # diagnose reads the trained params, and says so when the hidden size does not match.
    os.rename(ckpt, tmp_path / "elman")
    bad = _run(
        "diagnose",
        "--cells",
        "elman",
        "--checkpoint-dir",
        str(tmp_path),
        "--hidden-size",
        "5",
        "--seq-len",
        "6",
    )
    assert bad.returncode == 2
    assert "Pass the --hidden-size it was trained with" in bad.stderr


def test_diagnose_end_to_end(tmp_path):
    out = _run(
        "diagnose",
        "--cells",
        "elman,gru",
        "--seq-len",
        "8",
        "--hidden-size",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "g.png"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("elman") for line in lines)
    assert any(line.startswith("gru") for line in lines)
    assert "|dL/dh_1| / |dL/dh_T|" in out.stdout
    assert (tmp_path / "g.png").stat().st_size > 0


def test_bad_input_exits_non_zero_in_a_subprocess():
    out = _run("train", "--task", "sorting", "--cell", "lstm", "--seq-len", "5", "--steps", "1")
    assert out.returncode == 2
    assert "argument --task: invalid choice: 'sorting'" in out.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--task", "adding", "--cell", "rnn", "--seq-len", "5", "--steps", "1"],
            "argument --cell: invalid choice: 'rnn'",
        ),
        (
            ["train", "--task", "adding", "--cell", "lstm", "--seq-len", "5", "--steps", "-3"],
            "argument --steps: expected a positive integer, got '-3'",
        ),
        (
            ["train", "--task", "adding", "--cell", "lstm", "--seq-len", "five", "--steps", "1"],
            "argument --seq-len: expected a positive integer, got 'five'",
        ),
        (
            [
                "train",
                "--task",
                "adding",
                "--cell",
                "lstm",
                "--seq-len",
                "5",
                "--steps",
                "1",
                "--lr",
                "nan",
            ],
            "argument --lr: expected a positive number, got 'nan'",
        ),
        (
            [
                "train",
                "--task",
                "char",
                "--cell",
                "gru",
                "--seq-len",
                "5",
                "--steps",
                "1",
                "--text",
                "/no/such/file.txt",
            ],
            "--text: file '/no/such/file.txt' does not exist",
        ),
        (
            [
                "train",
                "--task",
                "adding",
                "--cell",
                "gru",
                "--seq-len",
                "5",
                "--steps",
                "1",
                "--resume",
            ],
            "--resume needs --checkpoint-dir",
        ),
        (
            ["diagnose", "--cells", "elman,transformer"],
            "argument --cells: unknown cell 'transformer'; choose from elman, lstm, gru",
        ),
        (["diagnose", "--checkpoint-dir", "/no/such/dir"], "no directory '/no/such/dir/elman'"),
    ],
)
def test_bad_input_gives_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
