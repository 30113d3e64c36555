"""distill-data: the target's own greedy answers, batched, sharded over processes, resumable.

Real runs on the tiny LLaVA target (PyTorch generation, subprocesses for torchrun and for
the kill); the batched answers equal one-by-one greedy decoding."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.demo.synthetic_images import ATTRIBUTES, examples, score
from vispec.exporter.drafters import shards
from vispec.exporter.drafters.distill import (
    HELD_OUT_CHAT,
    IMAGE_QUESTIONS,
    DistillDataConfig,
    _eos_ids,
    distill_data,
    generate_answers,
    read_data,
    read_prompts,
    written_question,
)
from vispec.exporter.loading import load_target
from vispec.exporter.reference import hf_greedy
from vispec.runtime.errors import VispecError
from vispec.runtime.processors import load_processor

SMALL = ["--text-prompts", "12", "--synthetic-images", "3", "--max-new-tokens", "10",
         "--image-tokens", "6", "--batch", "4"]
CONFIG = DistillDataConfig(text_prompts=12, synthetic_images=3, max_new_tokens=10, image_tokens=6,
                           batch=4)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def cli_cmd(*args):
    return [sys.executable, "-m", "vispec.exporter.cli", *map(str, args)]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vispec.exporter.cli", *map(str, args)]


def one_thread_env():
    """A subprocess on one CPU thread, on the CPU even where a GPU is."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def by_job(folder):
    """job index -> (ids, e, f) of a finished data folder."""
    return {int(a["job"]): (a["ids"], a["embeds"], a["features"]) for a in read_data(folder)}


@pytest.fixture(scope="module")
def single(tiny_target, tmp_path_factory):
    """The reference: SMALL data from one process on the CPU."""
    model_dir, _ = tiny_target("llava")
    out = tmp_path_factory.mktemp("single") / "data"
    done = subprocess.run(cli_cmd("distill-data", model_dir, out, *SMALL), capture_output=True,
                          text=True, timeout=300, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_batched_answers_equal_one_by_one_greedy(tiny_target, noise_image, family):
    model_dir, _ = tiny_target(family)
    adapter, glue = load_target(model_dir)
    processor = load_processor(model_dir)
    texts = ["Hi", "Describe the red boat and the sea around it, please.", "What is this?"]
    prompts = [glue.prepare(processor, t, []) for t in texts]
    prompts += [glue.prepare(processor, t, [noise_image(seed=i)]) for i, t in enumerate(texts)]
    assert len({len(p.input_ids) for p in prompts}) > 2  # left padding is exercised
    answers = generate_answers(adapter, prompts, [16, 9, 16, 16, 16, 12])
    eos = _eos_ids(adapter.model)
    for prompt, answer, budget in zip(prompts, answers, [16, 9, 16, 16, 16, 12]):
        reference = hf_greedy(adapter, prompt, budget)
        end = next((j + 1 for j, t in enumerate(reference) if t in eos), len(reference))
        assert answer == reference[:end]


def test_data_holds_every_job_once_with_teacher_arrays(single):
    data = read_data(single)
    jobs = json.loads((single / "prompts.json").read_text())
    assert sorted(int(a["job"]) for a in data) == list(range(len(jobs)))
    images = [j for j in jobs if j["image"] is not None]
    assert len(images) == 3 * len(IMAGE_QUESTIONS)
    assert {j["text"] for j in images} == set(IMAGE_QUESTIONS)
    assert not {j["text"] for j in jobs} & set(HELD_OUT_CHAT)
    for a, job in zip(data, jobs):
        answer = len(a["ids"]) - int(a["label_from"])
        assert 1 <= answer <= job["max_new_tokens"]
        assert a["embeds"].shape == a["features"].shape == (len(a["ids"]), 64)
        assert a["embeds"].dtype == np.float16 and np.isfinite(a["features"]).all()


def test_two_processes_write_what_one_writes(single, tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    done = subprocess.run(torchrun("distill-data", model_dir, tmp_path / "data", *SMALL),
                          capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = by_job(tmp_path / "data"), by_job(single)
    assert two.keys() == one.keys()
    for job, (ids, e, f) in one.items():
        assert two[job][0].tolist() == ids.tolist()
        np.testing.assert_allclose(two[job][2].astype(np.float32), f.astype(np.float32),
                                   atol=2e-3)  # float16 storage of the same forward


@pytest.mark.torch_cuda
def test_a_gpu_writes_what_the_cpu_writes(single, tiny_target, tmp_path):
    """In this process the target runs on the GPU (float32): the same answers, the same
    features within float16 storage and TF32 convolutions (1e-2)."""
    import torch

    model_dir, _ = tiny_target("llava")
    torch.cuda.reset_peak_memory_stats()
    gpu, cpu = by_job(distill_data(model_dir, tmp_path / "data", CONFIG)), by_job(single)
    assert torch.cuda.max_memory_allocated() > 0  # it ran there
    assert gpu.keys() == cpu.keys()
    for job, (ids, e, f) in cpu.items():
        assert gpu[job][0].tolist() == ids.tolist(), job
        np.testing.assert_allclose(gpu[job][2].astype(np.float32), f.astype(np.float32), atol=1e-2)


def test_a_killed_run_finishes_without_loss_or_duplicates(single, tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    out = tmp_path / "data"
    args = cli_cmd("distill-data", model_dir, out, *SMALL[:-1], "1")  # one prompt per chunk
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=one_thread_env())
    deadline = time.time() + 120
    while not list((out / "answers").glob("chunk-*.npz")) and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    before = {p.name for p in (out / "answers").glob("chunk-*.npz")}
    with pytest.raises(VispecError, match="unfinished"):
        read_data(out)
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"answers: {len(before)}/" in done.stderr  # the finished chunks were kept, not redone
    assert not list(out.rglob("*.partial*"))
    again, one = by_job(out), by_job(single)
    assert again.keys() == one.keys()
    assert all(again[j][0].tolist() == one[j][0].tolist() for j in one)


def test_other_settings_are_refused_and_overwrite_starts_over(single, tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    with pytest.raises(VispecError, match="other settings.*batch"):
        distill_data(model_dir, single, DistillDataConfig(**{**CONFIG.__dict__, "batch": 2}))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    with pytest.raises(VispecError, match="not a vispec-export data folder"):
        shards.open_folder(tmp_path / "theirs", {"a": 1})


@pytest.mark.parametrize("make, expected", [
    (lambda d: d.joinpath("p.txt").write_text("\n  \n"), "holds no prompt"),
    (lambda d: d.joinpath("p.txt").write_bytes(b"\xff\xfe\xfa"), "cannot read the prompts"),
])
def test_bad_prompts_file_exits_2(tiny_target, tmp_path, make, expected):
    model_dir, _ = tiny_target("llava")
    make(tmp_path)
    result = CliRunner().invoke(cli, ["distill-data", str(model_dir), str(tmp_path / "out"),
                                      "--prompts", str(tmp_path / "p.txt")])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_image_folder_without_images_exits_2(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    result = CliRunner().invoke(cli, ["distill-data", str(model_dir), str(tmp_path / "out"),
                                      "--images", str(tmp_path)])
    assert result.exit_code == 2 and "holds no image" in result.output, result.output


def test_prompts_file_and_image_folder(tiny_target, tmp_path, noise_image):
    model_dir, _ = tiny_target("llava")
    (tmp_path / "p.txt").write_text("What is a cloud?\n\nName three fruits.\n")
    (tmp_path / "pics").mkdir()
    noise_image(seed=4).save(tmp_path / "pics" / "a.png")
    out = distill_data(model_dir, tmp_path / "out", DistillDataConfig(max_new_tokens=4,
                       image_tokens=4, batch=3), prompts=read_prompts(tmp_path / "p.txt"),
                       images_dir=tmp_path / "pics")
    jobs = json.loads((out / "prompts.json").read_text())
    assert [j["text"] for j in jobs] == [*IMAGE_QUESTIONS, "What is a cloud?", "Name three fruits."]
    assert len(read_data(out)) == 4


def test_written_questions_are_kept_only_when_they_are_questions():
    assert written_question('"What makes bread rise so high?"\nMore') == "What makes bread rise so high?"
    assert written_question("Question: Why do owls hunt at night?") == "Why do owls hunt at night?"
    assert written_question("Here's a list of tips:") is None
    assert written_question("What a topic! I'm glad to help. What's your question?") is None
    assert written_question("Why?") is None
    assert written_question("") is None


def test_detailed_answers_name_the_four_attributes_in_30_words_or_more():
    for example in examples(64, 3, "heldout"):
        answer = example.scene.detailed_answer()
        assert len(answer.split()) >= 30
        assert score(answer, example.scene) == {a: True for a in ATTRIBUTES}
        assert answer.startswith(example.scene.answer() + " The picture shows")


def test_more_built_in_prompts_than_the_set_holds_exit_2(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    result = CliRunner().invoke(cli, ["distill-data", str(model_dir), str(tmp_path / "data"),
                                      "--text-prompts", "5000"])
    assert result.exit_code == 2 and "the built-in set has 2020" in result.output, result.output
    assert not (tmp_path / "data").exists()


def test_config_rejects_bad_sizes():
    with pytest.raises(VispecError, match="batch=0"):
        DistillDataConfig(batch=0)
