"""The corpus tasks (`stdlib`, `text`, `tokens`): split by path hash, token arrays equal to the files' bytes,
the content-keyed cache and BPE tokenizer cache, and bad input as one line with exit code 2.

Expected values come from the files themselves (bytes read here) and hashlib, not from the code under test.
"""
import hashlib
import math
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routerlab.cli import app
from routerlab.errors import ConfigError
from routerlab.tasks import build_task
from routerlab.tasks import corpus as corpus_module
from routerlab.tasks import tokenizer as tokenizer_module

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SUBSET = ["json/*.py", "email/mime/*.py", "html/*.py", "textwrap.py", "bisect.py", "colorsys.py"]


@pytest.fixture
def small_root(tmp_path):
    """A copy of a few stdlib files (a tiny stdlib with three packages and three top-level modules)."""
    root = tmp_path / "lib"
    for pattern in SUBSET:
        for path in STDLIB.glob(pattern):
            dest = root / path.relative_to(STDLIB)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    (root / "test" / "test_x").mkdir(parents=True)
    (root / "test" / "test_x" / "data").mkdir()
    (root / "test" / "test_x" / "data" / "broken.py").write_bytes(b"def (:\n")  # a test fixture: skipped
    (root / "test" / "test_x" / "test_one.py").write_bytes(b"import unittest\n" * 50)
    (root / "site-packages" / "pkg").mkdir(parents=True)
    (root / "site-packages" / "pkg" / "m.py").write_bytes(b"x = 1\n")
    return root


def spec(root, cache, **kw):
    return {"name": "stdlib", "root": str(root), "cache_dir": str(cache), "block_size": 32, "val_frac": 0.3, "test_frac": 0.1, **kw}


def expected_split(rel: str, val: float, test: float) -> str:
    u = int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def test_stdlib_tokens_are_the_files_bytes_split_by_path_hash(small_root, tmp_path):
    task = build_task(spec(small_root, tmp_path / "cache"))
    files = sorted(p.relative_to(small_root).as_posix() for p in small_root.rglob("*.py"))
    kept = [f for f in files if not f.startswith("site-packages/") and "/data/" not in f]
    assert "test/test_x/test_one.py" in kept and len(kept) == len(files) - 2
    for split in ("train", "val", "test"):
        mine = [f for f in kept if expected_split(f, 0.3, 0.1) == split]
        want = b"".join((small_root / f).read_bytes() + b"\x00" for f in mine)  # \x00 marks the EOT position
        ids = np.asarray(task.tokens[split]).astype(np.int64)
        assert len(ids) == len(want)
        as_bytes = np.where(ids == 256, 0, ids)
        assert bytes(as_bytes.astype(np.uint8)) == want
        assert (ids == 256).sum() == len(mine)  # one end-of-document token per file
        domain = [f.split("/")[0] if "/" in f else "(modules)" for f in mine]
        labels = np.concatenate([np.full(len((small_root / f).read_bytes()) + 1, task.domains.index(d)) for f, d in zip(mine, domain)]) if mine else np.zeros(0)
        assert np.array_equal(np.asarray(task.token_labels[split]), labels)
    assert task.domains == ["(modules)", "email", "html", "json", "test"]
    assert task.vocab_size == 257 and task.tokens["train"].dtype == np.uint16
    # the batch is a window of the array, the target shifted by one, the label the file's domain
    b = task.batch("train", 3, torch.Generator().manual_seed(0))
    arr = np.asarray(task.tokens["train"]).astype(np.int64)
    for row in range(3):
        window = torch.cat([b.inputs[row], b.targets[row, -1:]]).numpy()
        start = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(arr, 33) == window).all(1))[0])
        assert torch.equal(b.targets[row, :-1], b.inputs[row, 1:])
        assert np.array_equal(b.labels[row].numpy(), np.asarray(task.token_labels["train"][start : start + 32]))
    # val unigram entropy by hand
    counts = Counter(np.asarray(task.tokens["val"]).tolist())
    n = sum(counts.values())
    assert task.data_info()["unigram_entropy_val"] == pytest.approx(-sum(c / n * math.log(c / n) for c in counts.values()), abs=1e-5)


def test_cache_is_keyed_by_content_and_reused(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_task(spec(small_root, cache))
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 1 and first.data_checksum[:16] in folders[0]
    calls = []
    monkeypatch.setattr(corpus_module, "save_dir_atomic", lambda *a, **k: calls.append(1))  # any write would show here
    again = build_task(spec(small_root, cache))
    assert not calls and again.data_checksum == first.data_checksum
    assert isinstance(again.tokens["train"], np.memmap)
    monkeypatch.undo()
    # same content under another path: same checksum; changed content: a new checksum and folder
    moved = tmp_path / "moved"
    shutil.copytree(small_root, moved)
    assert build_task(spec(moved, cache)).data_checksum == first.data_checksum
    (moved / "bisect.py").write_bytes((moved / "bisect.py").read_bytes() + b"# changed\n")
    changed = build_task(spec(moved, cache))
    assert changed.data_checksum != first.data_checksum
    assert len(list(cache.iterdir())) == 2
    # the checksum is sha256 over sorted (path, sha256(content)) lines: recomputed here
    h = hashlib.sha256()
    for f in sorted(p.relative_to(small_root).as_posix() for p in small_root.rglob("*.py")):
        if not f.startswith("site-packages/") and "/data/" not in f:
            h.update(f"{f}\0{hashlib.sha256((small_root / f).read_bytes()).hexdigest()}\n".encode())
    assert first.data_checksum == h.hexdigest()


def test_bpe_trained_on_train_split_cached_by_data_hash(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    task = build_task(spec(small_root, cache, tokenizer="bpe", vocab_size=400))
    assert task.vocab_size == 400 and len(list(cache.glob("bpe-*-400.json"))) == 1
    val_text = b"".join((small_root / f).read_bytes() for f in sorted(p.relative_to(small_root).as_posix() for p in small_root.rglob("*.py"))
                        if not f.startswith("site-packages/") and "/data/" not in f and expected_split(f, 0.3, 0.1) == "val")
    eot = task.tokenizer.eot
    ids = [i for i in np.asarray(task.tokens["val"]).tolist() if i != eot]
    assert task.decode(ids) == val_text.decode("utf-8")  # byte-level BPE round-trips the text
    assert len(ids) < 0.8 * len(val_text)  # and compresses it
    # the tokenizer is reused from disk: a second task with a new split cache never trains again
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a: pytest.fail("trained twice"))
    again = build_task(spec(small_root, cache, tokenizer="bpe", vocab_size=400, block_size=16, test_frac=0.1))
    assert np.array_equal(np.asarray(again.tokens["val"]), np.asarray(task.tokens["val"]))


def test_text_task_file_and_folder(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    task = build_task({"name": "text", "path": str(f), "cache_dir": str(tmp_path / "c"), "block_size": 16, "val_frac": 0.1, "test_frac": 0.0})
    train = bytes(np.asarray(task.tokens["train"])[:-1].astype(np.uint8))
    val = bytes(np.asarray(task.tokens["val"])[:-1].astype(np.uint8))
    assert train + val == text.encode() and train.endswith(b"\n")
    assert abs(len(val) - 0.1 * len(text)) < 40
    folder = tmp_path / "docs"
    for sub in ("a", "b"):
        for i in range(12):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / f"{i}.txt").write_text(f"{sub} document {i}\n" * 20)
    (folder / "a" / "blob.bin").write_bytes(b"\x00\x01" * 100)  # binary: skipped
    task = build_task({"name": "text", "path": str(folder), "cache_dir": str(tmp_path / "c"), "block_size": 16, "val_frac": 0.3})
    assert task.domains == ["a", "b"] and sum(task.info["files"].values()) == 24


def test_tokens_task_reads_nanogpt_layout(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 5000, 3000).astype(np.uint16), rng.integers(0, 5000, 500).astype(np.uint16)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    task = build_task({"name": "tokens", "path": str(tmp_path), "block_size": 8})
    assert task.vocab_size == int(max(train.max(), val.max())) + 1
    b = task.batch("val", 4, torch.Generator().manual_seed(1))
    for row in b.inputs.numpy():
        assert (np.lib.stride_tricks.sliding_window_view(val, 8) == row).all(1).any()
    assert torch.equal(b.labels, b.inputs * 16 // task.vocab_size)
    single = tmp_path / "all.bin"
    np.concatenate([train, val]).astype(np.uint32).tofile(single)
    one = build_task({"name": "tokens", "path": str(single), "dtype": "uint32", "vocab_size": 5000, "val_frac": 0.1, "block_size": 8})
    assert len(one.tokens["val"]) == 350 and np.array_equal(np.asarray(one.tokens["train"]), np.concatenate([train, val])[:3150])
    with pytest.raises(ConfigError, match="not below task.vocab_size=100"):
        build_task({"name": "tokens", "path": str(tmp_path), "vocab_size": 100})


@pytest.mark.parametrize("task_args,message", [
    (["task.name=stdlib", "task.root=/no/such/lib"], "the Python standard library folder '/no/such/lib' does not exist"),
    (["task.name=text", "task.path=/no/such/corpus"], "task.path '/no/such/corpus' does not exist"),
    (["task.name=tokens", "task.path=/no/such/bins"], "task.path '/no/such/bins' does not exist; give a folder with train.bin"),
    (["task.name=stdlib", "task.root=TMP", "task.include=[nothing/*]"], r"no .py files under '.*' match include=\['nothing/\*'\]"),
])
def test_missing_corpus_is_one_line_exit_2(task_args, message, tmp_path):
    import re

    args = ["train", "--no-progress", "--set", f"run.dir={tmp_path / 'runs'}"]
    for a in [a.replace("TMP", str(tmp_path)) for a in task_args] + ([f"task.cache_dir={tmp_path / 'cache'}"] if "tokens" not in task_args[0] else []):
        args += ["--set", a]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing written


def test_trainer_records_data_checksum(small_root, tmp_path, tiny_overrides):
    from routerlab.checkpoint import load_checkpoint, save_checkpoint
    from routerlab.config import load_config
    from routerlab.train import Trainer

    overrides = [o for o in tiny_overrides if not o.startswith("train.steps")] + [
        "task.name=stdlib", f"task.root={small_root}", f"task.cache_dir={tmp_path / 'cache'}", "task.block_size=32",
        "task.val_frac=0.3", "task.test_frac=0.1", "train.steps=2", "train.eval_every=2"]
    trainer = Trainer(load_config(None, overrides))
    metrics = trainer.fit()
    trainer.close()
    info = trainer.data_info
    assert info["data_checksum"] == trainer.task.data_checksum and info["tokens"]["train"] > 10000
    state = load_checkpoint(trainer.checkpoint_path)
    assert state["data_checksum"] == info["data_checksum"]
    assert np.isfinite(metrics["loss"])
    with pytest.raises(ConfigError, match="was trained on data"):  # resuming on other data is refused
        state["data_checksum"] = "0" * 64
        save_checkpoint(tmp_path / "other.pt", state)
        Trainer(load_config(None, overrides), resume=tmp_path / "other.pt", log=False)
