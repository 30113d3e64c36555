"""The runtime commands: streamed text, JSON output and statistics, bench, --version, no torch."""
import json
import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.runtime.processors import load_processor
from vispec.runtime.streaming import TextStreamer


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith("vispec-export, version ")


def test_streamed_pieces_add_up_to_the_decoded_reply(tiny_target):
    tokenizer = load_processor(tiny_target("llava")[0]).tokenizer
    ids = np.random.default_rng(0).integers(0, len(tokenizer), 40).tolist()
    pieces = []
    streamer = TextStreamer(tokenizer, pieces.append)
    for i in range(0, len(ids), 3):
        streamer(ids[i:i + 3])
    streamer.flush()
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(pieces) > 1


def test_generate_json_and_stats_file(tiny_target, tiny_drafter, tmp_path):
    _, artifacts = tiny_target("llava")
    _, drafter = tiny_drafter("vispec", "llava")
    args = ("generate", "--model", artifacts, "--prompt", "Tell me a story", "--max-new-tokens", 12)
    streamed = run(*args, "--drafter", drafter)
    assert streamed.exit_code == 0, streamed.output
    assert "tree auto" in streamed.output and "time to first token" in streamed.output
    as_json = run(*args, "--drafter", drafter, "--total-tokens", 8, "--json",
                  "--stats-json", tmp_path / "stats.json")
    assert as_json.exit_code == 0, as_json.output
    reply = json.loads(as_json.stdout)
    assert streamed.stdout == reply["text"] + "\n"  # streamed == final text
    assert 1 < len(reply["tokens"]) == reply["new_tokens"] <= 12
    assert reply["mode"] == "speculative (vispec, tree 8,3,4)"
    assert len(reply["rounds"]) == reply["target_passes"] - 1
    assert sum(r["emitted"] for r in reply["rounds"]) == reply["new_tokens"] - 1
    assert all(r["tree"] == [8, 3, 4] and r["verify_ms"] > 0 for r in reply["rounds"])
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["rounds"] == reply["rounds"] and "text" not in saved


def test_generate_lookup_setting(tiny_target, tiny_drafter):
    args = ("generate", "--model", tiny_target("llava")[1], "--drafter",
            tiny_drafter("eagle", "llava")[1], "--prompt", "Tell me a story",
            "--max-new-tokens", 8, "--json")
    off, on = run(*args, "--lookup", 0), run(*args)
    assert off.exit_code == on.exit_code == 0, off.output + on.output
    assert json.loads(off.stdout)["tokens"] == json.loads(on.stdout)["tokens"]
    bad = run(*args, "--lookup", -1)
    assert bad.exit_code == 2 and "--lookup" in bad.output


def test_one_token_has_no_decode_speed(tiny_target):
    result = run("generate", "--model", tiny_target("llava")[1], "--prompt", "Hi",
                 "--max-new-tokens", 1)
    assert result.exit_code == 0 and "no decode pass" in result.output


def test_stats_json_in_a_missing_folder(tiny_target, tmp_path):
    result = run("generate", "--model", tiny_target("llava")[1], "--prompt", "Hi",
                 "--stats-json", tmp_path / "nope" / "s.json")
    assert result.exit_code == 2 and "Hint:" in result.output


def test_bench_table_json_and_chart(tiny_target, tiny_drafter, tmp_path):
    _, artifacts = tiny_target("llava")
    _, drafter = tiny_drafter("eagle", "llava")
    args = ("bench", "--model", artifacts, "--drafter", drafter, "--prompt", "Hello",
            "--max-new-tokens", 6, "--repeats", 1, "--trees", "4:2:2")
    result = run(*args, "--json", "--png", tmp_path / "bench.png")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["setting"] for r in rows] == ["plain", "4,2,2", "auto"]
    assert all(r["identical"] and r["tokens_per_second"] > 0 for r in rows)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    table = run(*args)
    assert table.exit_code == 0 and "| plain |" in table.output


def test_bench_bad_trees(tiny_target, tiny_drafter):
    args = ("bench", "--model", tiny_target("llava")[1], "--drafter",
            tiny_drafter("eagle", "llava")[1], "--repeats", 1)
    malformed = run(*args, "--trees", "4:2")
    too_wide = run(*args, "--trees", "8:2:99")
    assert malformed.exit_code == 2 and "total:depth:top_k" in malformed.output
    assert too_wide.exit_code == 2 and "top-k" in too_wide.output


def test_generate_never_imports_torch(tiny_target):
    """With torch installed, the runtime commands keep it (and its import time) out."""
    code = ("import sys; from click.testing import CliRunner; from vispec.exporter.cli import cli; "
            f"r = CliRunner().invoke(cli, ['generate', '--model', {str(tiny_target('llava')[1])!r}, "
            "'--prompt', 'Hi', '--max-new-tokens', '2']); "
            "print(r.exit_code, sys.modules.get('torch'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "VISPEC_CACHE_DIR": os.environ["VISPEC_CACHE_DIR"]})
    assert done.stdout.split() == ["0", "None"], done.stdout + done.stderr
