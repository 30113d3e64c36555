"""The README's Python API sample runs as written."""
import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_python_api_sample_runs(tmp_path):
    done = subprocess.run([sys.executable, str(SAMPLES / "python_api.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "speculative:" in done.stdout
