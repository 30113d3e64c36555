"""The README's Python API sample runs as written, and leaves no temporary folder behind."""
import os
import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_python_api_sample_runs(tmp_path):
    """Without a WORKDIR it works in a temporary folder and removes it."""
    temp = tmp_path / "temp"
    temp.mkdir()
    done = subprocess.run([sys.executable, str(SAMPLES / "python_api.py")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speculative:" in done.stdout
    # tempfile names its folders tmp*; libraries keep caches of their own there (torchinductor_*)
    assert [p.name for p in temp.iterdir() if p.name.startswith("tmp")] == []
