"""benchmarks/peers.py without its peer: the CPU contention sampler and the summary logic."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "peers.py"
spec = importlib.util.spec_from_file_location("peers", SCRIPT)
peers = sys.modules["peers"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(peers)


def test_parses_proc_stat_lines():
    assert peers.parse_stat("cpu  100 5 50 800 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8\n") == (161, 981)
    # a process name with spaces and parentheses; utime 7, stime 9 are fields 14 and 15
    line = "42 (tricky (name) x) S 1 2 3 4 5 6 7 8 9 10 7 9 0 0 20 0 1 0 100 200 300"
    assert peers.parse_proc_stat(line) == ("tricky (name) x", 16)


def test_contention_counts_others_not_ourselves():
    before = peers.CpuSample(busy=1000, total=4000, procs={1: ("us", 100), 2: ("make", 50)})
    after = peers.CpuSample(busy=1300, total=4400, procs={1: ("us", 250), 2: ("make", 150),
                                                            3: ("new", 40)})
    c = peers.contention(before, after, own_pid=1, seconds=2.0, hz=100)
    assert c.cores == pytest.approx(0.75)  # (300 busy - 150 ours) jiffies over 200
    assert c.by_process == (("make[2]", 0.5), ("new[3]", 0.2))
    assert c.contended(0.5) and not c.contended(0.8)


def test_sampler_sees_a_busy_process_beside_us():
    spin = "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.1)
        before, t0 = peers.sample_cpu(), time.perf_counter()
        time.sleep(0.8)
        after = peers.sample_cpu()
        c = peers.contention(before, after, os.getpid(), time.perf_counter() - t0)
        spent = after.procs[child.pid][1] - before.procs[child.pid][1]
        assert spent > 0 and c.cores > 0
        assert os.getpid() in after.procs and after.total > before.total
    finally:
        child.kill()
        child.wait()


def _run(side, mode, precision, prompt, tokens, tok_s, ttft, cores=0.0, group="text", repeat=0):
    decode = (len(tokens) - 1) / tok_s
    return peers.Run(side, mode, precision, group, prompt, tuple(tokens), ttft, decode,
                     peers.Contention(cores, (("busy[9]", cores),)), repeat)


def test_summary_medians_ratios_identity_and_contention():
    P, G = peers.PROJECT, peers.PEER
    runs = [_run(P, "plain", "fp32", 0, [1, 2, 3], 40, 0.1),
            _run(P, "plain", "fp32", 0, [1, 2, 3], 50, 0.2, repeat=1),
            _run(P, "plain", "fp32", 0, [1, 2, 3], 60, 0.3, repeat=2),
            _run(G, "plain", "fp32", 0, [1, 2, 3], 25, 0.4, repeat=1),
            _run(P, "plain", "int4", 0, [1, 2], 100, 0.1), _run(G, "plain", "int4", 0, [1, 5], 200, 0.1,
                                                               cores=0.9)]
    fp32, int4 = peers.summarize(runs)
    assert fp32.tok_s == {"project plain": 50, "ort-genai plain": 25}
    assert fp32.ratio("project plain", "ort-genai plain") == 2.0
    assert fp32.ratio("project plain", "ort-genai plain", "ttft") == pytest.approx(0.5)
    assert fp32.identical is True and int4.identical is None  # identity is an fp32 check
    assert not fp32.contended() and int4.contended()
    table = peers.format_groups([fp32, int4])
    assert "CONTENDED: busy[9]" in table and table.count("CONTENDED") == 1
    runs.append(_run(G, "plain", "fp32", 1, [7, 8], 25, 0.4))
    runs.append(_run(P, "plain", "fp32", 1, [7, 9], 25, 0.4))
    assert peers.summarize(runs)[0].identical is False


def test_ratios_pair_runs_of_one_prompt_and_repeat():
    """Ratios are medians over runs of one prompt and repeat (back to back): a repeat whose
    project run alone was slowed (a burst of load) counts once; the ratio of the medians,
    over unpaired runs, reads it as half the speed."""
    P, G = peers.PROJECT, peers.PEER
    runs = []
    for repeat, (mine, theirs) in enumerate(((90, 100), (45, 50), (30, 100))):
        runs.append(_run(P, "plain", "int4", 0, [1, 2, 3], mine, 0.1, repeat=repeat))
        runs.append(_run(G, "plain", "int4", 0, [1, 2, 3], theirs, 0.2, repeat=repeat))
    group, = peers.summarize(runs)
    assert group.ratio("project plain", "ort-genai plain") == pytest.approx(0.9)
    assert group.tok_s["project plain"] / group.tok_s["ort-genai plain"] == pytest.approx(0.45)
    assert group.to_dict()["ratios"] == pytest.approx(
        {"plain / peer": 0.9, "TTFT plain / peer": 0.5, "spec / peer": None, "spec / plain": None})


def test_a_group_is_contended_by_its_time_weighted_load_not_one_short_run():
    # 40 ms image answers: one jiffy of someone else reads 0.25 cores in that run alone
    P = peers.PROJECT
    runs = [_run(P, "plain", "int4", i, list(range(9)), 200, 0.0, cores=0.25 if i == 3 else 0.0,
                 group="image") for i in range(8)]
    [image] = peers.summarize(runs)
    assert image.others == pytest.approx(0.25 / 8) and not image.contended()
    runs += [_run(P, "plain", "int4", 9, list(range(200)), 200, 0.0, cores=0.5, group="image")]
    [image] = peers.summarize(runs)
    assert image.contended() and image.busiest == (("busy[9]", 0.5),)
