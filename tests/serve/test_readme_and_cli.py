"""The README's `openai` snippet runs as printed against `serve`, and the `vispec-export
serve` process stops gracefully on SIGTERM with a request in flight."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).parents[2] / "README.md"


def readme_snippet() -> str:
    serve = README.read_text().split("## Serve", 1)[1]
    return re.search(r"```python\n(.*?)```", serve, re.S).group(1)


def test_the_readme_openai_snippet_runs_as_printed(serve, noise_image, tmp_path, monkeypatch,
                                                   capsys):
    running = serve(model_name="llava")
    snippet = readme_snippet()
    assert 'base_url="http://127.0.0.1:8000/v1"' in snippet
    noise_image(56, 56, 3).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("127.0.0.1:8000", f"127.0.0.1:{running.port}"), {})
    printed = capsys.readouterr().out.splitlines()
    cached, tokens_per_pass = printed[-1].split()[-2:]
    assert int(cached) > 0 and float(tokens_per_pass) >= 1


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tiny_target, tiny_drafter,
                                                               free_port):
    port = free_port()
    command = [sys.executable, "-m", "vispec.exporter.cli", "serve",
               str(tiny_target("llava")[1]), "--drafter", str(tiny_drafter("vispec", "llava")[1]),
               "--port", str(port), "--total-tokens", "8", "--depth", "2", "--top-k", "3",
               "--model-name", "tiny"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "tiny", "max_tokens": 200, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        lines = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # the generation has begun
                lines.append(line)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    assert any('"finish_reason": "' in line for line in lines)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_the_server_modules_import_no_torch():
    code = ("import sys; import vispec.runtime.serve.app, vispec.runtime.serve.server, vispec.runtime.serve.triton; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
