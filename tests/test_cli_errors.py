"""Bad input through the CLI: one ``error: ... Hint: ...`` line, exit 2, nothing partial;
--overwrite never touches the current folder, an input or a folder that is not ours;
SIGTERM cleans up at once and SIGKILL's debris is swept by the next run."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import pytest
from click.testing import CliRunner
from PIL import Image

from vispec.exporter.cli import cli
from vispec.runtime.atomic import MARKER, atomic_output_dir
from vispec.runtime.errors import VispecError
from vispec.runtime.tree_policy import default_tree


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_bad_input(result, expected):
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Hint:" in lines[0], result.output
    assert expected in lines[0], result.output
    assert "Traceback" not in result.output


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def env(tiny_target, tiny_drafter, tmp_path):
    """Copies of a tiny llava model and its artifacts (to break), and its drafter's."""
    model_dir, artifacts = tiny_target("llava")
    checkpoint, drafter = tiny_drafter("eagle", "llava")
    return {"tmp": tmp_path, "model": shutil.copytree(model_dir, tmp_path / "model"),
            "art": shutil.copytree(artifacts, tmp_path / "art"), "drafter": drafter,
            "checkpoint": checkpoint}


def edit_manifest(art, change):
    d = json.loads((art / "manifest.json").read_text())
    change(d)
    (art / "manifest.json").write_text(json.dumps(d))


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def embed_output(d):
    return d["graphs"]["embed"]["spec"]["outputs"][0]


def generate(e, *args, prompt="hi"):
    return ["generate", "--model", e["art"], "--prompt", prompt, *args]


def truncated_weights(e):
    truncate(e["model"] / "model.safetensors")
    return ["export", e["model"], e["tmp"] / "out"]


def output_under_a_file(e):
    (e["tmp"] / "file").write_text("x")
    return ["export", e["model"], e["tmp"] / "file" / "out"]


def edited_dtype(e):
    edit_manifest(e["art"], lambda d: embed_output(d).update(dtype="float16"))
    return generate(e)


def edited_shape(e):
    edit_manifest(e["art"], lambda d: embed_output(d).update(shape=[1, "new", 65]))
    return generate(e)


def edited_vocab(e):
    edit_manifest(e["art"], lambda d: d["model"].update(vocab_size=512))
    return generate(e)


def truncated_graph(e):
    truncate(e["art"] / "lm.onnx")
    return generate(e)


def replaced_graph(e):
    shutil.copy(e["art"] / "embed.onnx", e["art"] / "lm.onnx")
    return generate(e)


def image(e):
    path = e["tmp"] / "image.png"
    Image.new("RGB", (56, 56)).save(path)
    return path


def pixel_bomb(e):
    """A PNG whose header claims 20000 x 20000 pixels, over PIL's decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    path = e["tmp"] / "bomb.png"
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return generate(e, "--image", path)


def manifest_list(e):
    (e["art"] / "manifest.json").write_text("[]")
    return generate(e)


def without_fact(fact):
    def make(e):
        edit_manifest(e["art"], lambda d: d["model"].pop(fact))
        return generate(e)
    return make


def drafter_without_top_k(e):
    drafter = shutil.copytree(e["drafter"], e["tmp"] / "drafter")
    edit_manifest(drafter, lambda d: d["model"].pop("top_k"))
    return generate(e, "--drafter", drafter)


def broken_processor(damage):
    def make(e):
        damage(e["art"] / "processor")
        return generate(e)
    return make


def export_without_tokenizer(e):
    (e["model"] / "tokenizer.json").unlink()
    return ["export", e["model"], e["tmp"] / "out"]


def truncated_drafter_checkpoint(e):
    checkpoint = shutil.copytree(e["checkpoint"], e["tmp"] / "checkpoint")
    truncate(checkpoint / "model.safetensors")
    return ["export-drafter", checkpoint, e["tmp"] / "out", "--target", e["model"]]


def bench(e, *args):
    return ["bench", "--model", e["art"], "--drafter", e["drafter"], *args]


BAD = {  # case -> (invocation, text the error line holds)
    "truncated safetensors": (truncated_weights, "truncated or corrupt"),
    "output under a file": (output_under_a_file, "is a file"),
    "manifest dtype edited": (edited_dtype, "does not match its manifest"),
    "manifest shape edited": (edited_shape, "does not match its manifest"),
    "manifest vocab_size edited": (edited_vocab, "vocab_size 512"),
    "truncated onnx": (truncated_graph, "cannot load graph"),
    "lm.onnx replaced": (replaced_graph, "does not match its manifest"),
    "max-new-tokens 0": (lambda e: generate(e, "--max-new-tokens", 0), "--max-new-tokens"),
    "max-new-tokens -3": (lambda e: generate(e, "--max-new-tokens", -3), "--max-new-tokens"),
    "total-tokens 0": (lambda e: generate(e, "--drafter", e["drafter"], "--total-tokens", 0),
                       "--total-tokens"),
    "depth 0": (lambda e: generate(e, "--drafter", e["drafter"], "--depth", 0), "--depth"),
    "top-k 0": (lambda e: generate(e, "--drafter", e["drafter"], "--top-k", 0), "--top-k"),
    "empty prompt": (lambda e: generate(e, prompt=" "), "prompt is empty"),
    "max-len 0": (lambda e: ["export", e["model"], e["tmp"] / "out", "--max-len", 0],
                  "--max-len"),
    "max-len -8": (lambda e: ["export", e["model"], e["tmp"] / "out", "--max-len", -8],
                   "--max-len"),
    "max-images 0": (lambda e: ["export", e["model"], e["tmp"] / "out", "--max-images", 0],
                     "--max-images"),
    "train without kind or init": (lambda e: ["train-drafter", e["model"], e["tmp"] / "out"],
                                   "--kind"),
    "threads 0": (lambda e: generate(e, "--threads", 0), "--threads"),
    "drafter with no-draft": (lambda e: generate(e, "--drafter", e["drafter"], "--no-draft"),
                              "exclude each other"),
    "missing model folder": (lambda e: ["generate", "--model", e["tmp"] / "nope", "--prompt",
                                        "hi"], "does not exist"),
    "unknown option": (lambda e: generate(e, "--bogus"), "--bogus"),
    "missing argument": (lambda e: ["export", e["model"]], "OUT_DIR"),
    "<image> in the prompt": (lambda e: generate(e, prompt="What is <image> here?"),
                              "image placeholder"),
    "<image> in the prompt with an image": (
        lambda e: generate(e, "--image", image(e), prompt="<image> What is it?"),
        "image placeholder"),
    "image over the pixel limit": (pixel_bomb, "too large"),
    "manifest a JSON list": (manifest_list, "a JSON list, expected an object"),
    "manifest without num_layers": (without_fact("num_layers"), "lack ['num_layers']"),
    "manifest without eos_token_ids": (without_fact("eos_token_ids"), "lack ['eos_token_ids']"),
    "drafter manifest without top_k": (drafter_without_top_k, "lack ['top_k']"),
    "processor folder missing": (broken_processor(shutil.rmtree), "processor does not exist"),
    "processor config.json corrupt": (
        broken_processor(lambda p: (p / "config.json").write_text("{")), "not valid JSON"),
    "tokenizer corrupt": (broken_processor(lambda p: truncate(p / "tokenizer.json")),
                          "cannot load the tokenizer"),
    "no chat template": (broken_processor(lambda p: (p / "chat_template.jinja").unlink()),
                         "no chat template"),
    "temperature nan": (lambda e: generate(e, "--temperature", "nan"), "temperature"),
    "temperature inf": (lambda e: generate(e, "--temperature", "inf"), "temperature"),
    "seed -5": (lambda e: generate(e, "--temperature", 1, "--seed", -5), "seed"),
    "export opset 0": (lambda e: ["export", e["model"], e["tmp"] / "out", "--opset", 0],
                       "--opset"),
    "build --profiles not numbers": (lambda e: ["build", e["art"], e["tmp"] / "engines",
                                                "--profiles", "decode=lots,prefill"], "--profiles"),
    "model folder without tokenizer.json": (export_without_tokenizer, "no tokenizer"),
    "truncated drafter checkpoint": (truncated_drafter_checkpoint, "truncated or corrupt"),
    "bench --png not a .png": (lambda e: bench(e, "--png", e["tmp"] / "b.txt"), "end in .png"),
    "--model a file": (lambda e: ["generate", "--model", e["art"] / "manifest.json",
                                  "--prompt", "hi"], "is a file, not a folder"),
    "export model a file": (lambda e: ["export", e["model"] / "config.json", e["tmp"] / "out"],
                            "is a file, not a folder"),
    "--drafter a checkpoint folder": (lambda e: generate(e, "--drafter", e["checkpoint"]),
                                      "`vispec-export export-drafter`"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_leaves_nothing(env, case):
    make, expected = BAD[case]
    args = make(env)
    before = sorted(p.name for p in env["tmp"].iterdir())
    assert_bad_input(run(*args), expected)
    assert sorted(p.name for p in env["tmp"].iterdir()) == before


@pytest.mark.parametrize("command", ["export", "generate --stats-json", "bench --png"])
def test_an_output_in_a_read_only_folder_is_refused_before_any_work(env, read_only_dir,
                                                                      command):
    args = {"export": ["export", env["model"], read_only_dir / "out"],
            "generate --stats-json": generate(env, "--stats-json", read_only_dir / "s.json"),
            "bench --png": bench(env, "--png", read_only_dir / "b.png")}[command]
    result = run(*args)
    assert_bad_input(result, "not writable")
    assert result.output.startswith("error: ")  # nothing ran before: no reply, no table
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("field", ["total_tokens", "depth", "top_k"])
def test_a_zero_tree_field_is_refused_not_defaulted(field):
    with pytest.raises(VispecError, match=f"{field}=0.*Hint:"):
        default_tree("eagle", "ort", **{field: 0})


@pytest.mark.parametrize("command", ["export", "demo"])
def test_overwrite_refuses_the_current_folder(env, monkeypatch, command):
    work = env["tmp"] / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    args = ["export", env["model"]] if command == "export" else ["demo"]
    for target in (".", ".."):
        assert_bad_input(run(*args, target, "--overwrite"), "current folder")
    assert (work / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_the_input_model(env):
    before = snapshot(env["model"])
    assert_bad_input(run("export", env["model"], env["model"], "--overwrite"), "overlaps")
    assert snapshot(env["model"]) == before


def test_overwrite_refuses_a_folder_that_is_not_ours(env):
    mine = env["tmp"] / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert_bad_input(run("export", env["model"], mine, "--overwrite"), "not written by")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_an_earlier_export(env):
    (env["art"] / "stale.txt").write_text("from before")
    result = run("export", env["model"], env["art"], "--overwrite", "--max-len", 64)
    assert result.exit_code == 0, result.output
    assert not (env["art"] / "stale.txt").exists() and not (env["art"] / MARKER).exists()
    assert json.loads((env["art"] / "manifest.json").read_text())["max_len"] == 64
    assert sorted(p.name for p in env["tmp"].iterdir()) == ["art", "model"]


KILLED_RUN = """
import sys, time
from vispec.exporter.cli import exit_on_sigterm
from vispec.runtime.atomic import atomic_output_dir
exit_on_sigterm()
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "half.txt").write_text("x")
    print(tmp, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_leaves_nothing_behind(tmp_path, sig):
    """SIGTERM: the CLI's handler removes the temporary folder at once; SIGKILL: the next
    run into the same folder sweeps it, whatever output it writes."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "out")],
                             stdout=subprocess.PIPE, text=True)
    partial = child.stdout.readline().strip()
    assert os.path.isdir(partial)
    child.send_signal(sig)
    child.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert child.returncode == 128 + signal.SIGTERM
        assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "other"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path):
    # Ctrl-C's default action in the child even where pytest runs in the background (`cmd &`
    # leaves SIGINT ignored, and a child inherits that)
    child = subprocess.Popen([sys.executable, "-m", "vispec.exporter.cli", "demo", "--tiny",
                              str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in child.stderr:  # the demo has started writing its output
        if line.startswith("building a tiny"):
            break
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
