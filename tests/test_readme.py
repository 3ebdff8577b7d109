"""The README's promise: a router in one file shows up in `routerlab routers` and trains."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_router_example_registers_and_trains(tmp_path):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    plugin = tmp_path / "tempered.py"
    plugin.write_text(code)
    env = {**os.environ, "ROUTERLAB_PLUGINS": str(plugin), "OMP_NUM_THREADS": "1"}
    listed = subprocess.run([sys.executable, "-m", "routerlab", "routers"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "tempered_topk" in listed.stdout
    trained = subprocess.run(
        [sys.executable, "-m", "routerlab", "train", "--no-progress", "--set", "router.name=tempered_topk", "--set", "router.tau=0.3",
         "--set", "train.steps=3", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", f"run.dir={tmp_path}"],
        env=env, capture_output=True, text=True,
    )
    assert trained.returncode == 0, trained.stderr
    assert list(tmp_path.glob("chars-tempered_topk-*/checkpoint.pt"))
