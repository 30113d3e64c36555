"""train-drafter scales out: under torchrun and accelerate launch (2 CPU processes, gloo) it
follows one process's loss curve with the same global batch (trained with --unroll 2: the
level the drafter drafts from its own hidden state too), and a killed run resumes to
the weights of an uninterrupted one.

Tolerance: the runs compute the same global batch from the same weights and draws; only
float32 summation order differs (two partial gradient sums all-reduced, two partial loss
sums), ~1e-7 relative per step, and Adam's normalised steps carry that along without
amplifying it much over 40 steps (measured: losses within 2e-7 relative, weights within
2e-6). Asserted: losses within 1e-5 relative, weights within 1e-4 absolute.
A resumed run on the CPU redoes exactly the same arithmetic: its weights are bit-identical."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from vispec.exporter.cli import cli
from vispec.exporter.drafters.checkpoint import new_drafter
from vispec.exporter.drafters.distill import DistillDataConfig, distill_data
from vispec.exporter.drafters.distributed import env_world
from vispec.exporter.drafters.export import target_lm_head
from vispec.exporter.drafters.train import STATE_FILE, RunOptions, TrainConfig, fit, load_samples
from vispec.runtime.errors import VispecError
from vispec.runtime.families import glue_for
from vispec.runtime.model_dir import read_config

STEPS = 40
TRAIN = ["--kind", "vispec", "--steps", STEPS, "--batch", 4, "--save-every", 2, "--unroll", 2]


def launch(prefix, model_dir, data, out, *extra):
    args = [*prefix, "-m", "vispec.exporter.cli", "train-drafter", model_dir, out, "--data", data,
            *TRAIN, *extra]
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=300, env=cpu_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def cpu_env():
    """Subprocesses on one CPU thread each, on the CPU even where a GPU is (gloo)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def log(out):
    return json.loads((out / "train_log.json").read_text())


def weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tiny_target, tmp_path_factory):
    """(model_dir, data folder, the one-process run's output)."""
    model_dir, _ = tiny_target("llava")
    root = tmp_path_factory.mktemp("ddp")
    data = distill_data(model_dir, root / "data", DistillDataConfig(
        text_prompts=12, synthetic_images=4, max_new_tokens=12, image_tokens=8, batch=4))
    launch([sys.executable], model_dir, data, root / "one")
    return model_dir, data, root / "one"


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_follow_one_process(setup, tmp_path, launcher):
    model_dir, data, one = setup
    prefix = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2"],
              "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "--main_process_port", "0"]}[launcher]
    launch(prefix, model_dir, data, tmp_path / "two")
    a, b = log(one), log(tmp_path / "two")
    assert (a["processes"], b["processes"]) == (1, 2)
    assert len(a["loss"]) == len(b["loss"]) == STEPS
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert a["loss"][-1] < a["loss"][0] - 0.2  # it learned: the curve is worth comparing
    wa, wb = weights(one), weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wb[key], wa[key], atol=1e-4, err_msg=key)


def test_a_killed_run_resumes_to_the_same_weights(setup, tmp_path):
    model_dir, data, one = setup
    out, state = tmp_path / "resumed", tmp_path / ".resumed.train-state"
    args = [sys.executable, "-m", "vispec.exporter.cli", "train-drafter", model_dir, out,
            "--data", data, *TRAIN]
    child = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=cpu_env())
    deadline = time.time() + 120
    while not (state / STATE_FILE).is_file() and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    done = launch([sys.executable], model_dir, data, out)
    assert "resuming from step" in done.stderr
    assert not state.exists()  # removed once the output was written
    assert log(out)["loss"] == log(one)["loss"]
    wa, wb = weights(one), weights(out)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_state_of_other_settings_is_refused(setup, tmp_path):
    model_dir, data, _ = setup
    samples, glue = load_samples(data), glue_for(read_config(model_dir))
    lm_head = target_lm_head(model_dir)
    options = RunOptions(state_dir=tmp_path, save_every=1)
    fit(new_drafter("eagle", model_dir), lm_head, glue, samples, TrainConfig(steps=2, batch=2),
        options=options)
    assert (tmp_path / STATE_FILE).is_file()
    with pytest.raises(VispecError, match="other settings"):
        fit(new_drafter("eagle", model_dir), lm_head, glue, samples,
            TrainConfig(steps=2, batch=2, lr=1e-3), options=options)


def test_autocast_precisions_need_cuda(setup, tmp_path):
    model_dir, data, _ = setup
    result = CliRunner().invoke(cli, ["train-drafter", str(model_dir), str(tmp_path / "out"),
                                      "--data", str(data), "--kind", "eagle", "--steps", "2",
                                      "--precision", "bf16"])
    assert result.exit_code == 2 and "needs CUDA" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.torch_cuda
def test_bf16_on_the_gpu_follows_the_cpu(setup, tmp_path):
    """In this process the run takes the GPU, in bf16 autocast: the CPU's float32 loss curve
    within bf16's rounding (first step 2e-2, the last 10 steps' mean 5e-2 relative)."""
    model_dir, data, one = setup
    result = CliRunner().invoke(cli, ["train-drafter", str(model_dir), str(tmp_path / "out"),
                                      "--data", str(data), *map(str, TRAIN),
                                      "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    gpu, cpu = np.array(log(tmp_path / "out")["loss"]), np.array(log(one)["loss"])
    assert len(gpu) == len(cpu) == STEPS
    assert abs(gpu[0] - cpu[0]) <= 2e-2 * cpu[0]
    assert abs(gpu[-10:].mean() - cpu[-10:].mean()) <= 5e-2 * cpu[-10:].mean()


def test_more_processes_than_gpus_are_refused(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: a clear error, not a CUDA crash."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(VispecError, match="--nproc_per_node 1, or CUDA_VISIBLE_DEVICES="):
        env_world()
