"""Every bad-input path of `routerlab train`: one line, exit code 2, no traceback, nothing half-written."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from routerlab.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def tiny(tmp_path):
    return ["--no-progress", "--set", f"run.dir={tmp_path / 'runs'}", "--set", "train.steps=2", "--set", "model.d_model=16",
            "--set", "model.n_heads=2", "--set", "model.expert_hidden=16", "--set", "train.batch_size=4", "--set", "train.eval_batches=1"]


def corpus(tmp_path, data: bytes):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = [
    (["--set", "router.name=nope"], "unknown router 'nope'; valid routers: .*softmax_topk"),
    (["--set", "task.name=nope"], "unknown task 'nope'; valid tasks: chars, clusters, digits"),
    (["--set", "router.k=9"], "k=9 is larger than num_experts=8"),
    (["--set", "model.capacity_factor=0"], "model.capacity_factor: Input should be greater than 0"),
    (["--set", "model.capacity_factor=-1.5"], "model.capacity_factor: Input should be greater than 0"),
    (["--set", "model.d_model=0"], "model.d_model: Input should be greater than or equal to 1"),
    (["--set", "train.batch_size=-3"], "train.batch_size: Input should be greater than or equal to 1"),
    (["--set", "train.stepz=3"], "train.stepz: Extra inputs are not permitted"),
    (["--set", "task.corpus=/no/such/file.txt"], "corpus file '/no/such/file.txt' does not exist"),
    (["--set", "router.name=hash", "--set", "task.name=digits"], "routes by token id, but task 'digits' has no token ids"),
    (["--config", "/no/such/config.yaml"], "config file '/no/such/config.yaml' does not exist"),
    (["--set", "train.device=tpu"], r"device must be 'cpu' or 'cuda\[:N\]', got 'tpu'"),  # brackets survive
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(args, message, tiny, tmp_path):
    code, output = run("train", *tiny, *args)
    assert code == 2, output
    assert "Traceback" not in output
    import re

    assert re.search(message, " ".join(output.split())), output
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"ok \xff\xfe broken", "is not valid UTF-8"),
    (b"too short", "too few for block_size=64"),
])
def test_bad_corpus_files(content, message, tiny, tmp_path):
    code, output = run("train", *tiny, "--set", f"task.corpus={corpus(tmp_path, content)}")
    assert code == 2 and message in " ".join(output.split()) and "Traceback" not in output


def test_a_corpus_file_trains(tiny, tmp_path):
    text = ("the quick brown fox jumps over the lazy dog. " * 60).encode()
    code, output = run("train", *tiny, "--set", f"task.corpus={corpus(tmp_path, text)}")
    assert code == 0, output
    assert "tensorboard --logdir" in output


def test_bad_checkpoints(tiny, tmp_path):
    code, output = run("train", *tiny)
    assert code == 0, output
    checkpoint = next((tmp_path / "runs").glob("*/checkpoint.pt"))
    before = checkpoint.read_bytes()

    code, output = run("train", *tiny, "--set", "model.num_experts=4", "--resume", str(checkpoint))
    assert code == 2 and "written by a different config" in " ".join(output.split())

    broken = tmp_path / "broken.pt"
    broken.write_bytes(before[: len(before) // 2])
    code, output = run("train", *tiny, "--resume", str(broken))
    assert code == 2 and "is corrupt or not a routerlab checkpoint" in " ".join(output.split())
    assert checkpoint.read_bytes() == before  # the good checkpoint was left alone
    assert not list((tmp_path / "runs").glob("**/*.tmp"))


def test_cli_lists_routers_and_tasks():
    code, output = run("routers")
    assert code == 0 and "softmax_topk" in output and "noisy_topk" in output and "w_importance" in output
    code, output = run("tasks")
    assert code == 0 and all(t in output for t in ("chars", "clusters", "digits"))


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "routerlab", "train", "--set", "router.name=nope"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown router 'nope'" in proc.stderr


def test_a_missing_optional_extra_disables_only_its_command(tmp_path):
    fake = tmp_path / "gymnasium"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ModuleNotFoundError('No module named gymnasium', name='gymnasium')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "routerlab", "rl", "train"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs the Python package 'gymnasium'" in proc.stderr and ".[all]" in proc.stderr
    listed = subprocess.run([sys.executable, "-m", "routerlab", "routers"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "softmax_topk" in listed.stdout
