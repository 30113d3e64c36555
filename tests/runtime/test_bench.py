"""The bench runs every setting on the same prompts, checks identity, and charts the sweep."""
from PIL import Image

from vispec.runtime.bench import AUTO, PLAIN, BenchRow, format_table, interleaved, plot, run_bench
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.tree import TreeConfig


def test_bench_rows_table_and_chart(tiny_target, tiny_drafter, noise_image, tmp_path):
    _, drafter_dir = tiny_drafter("vispec", "llava", 0)
    pipe = Pipeline(tiny_target("llava")[1], drafter_dir=drafter_dir, lookup=8)
    prompts = [("Describe the red boat.", []), ("What is this?", [noise_image(56, 56, 1)])]
    trees = [TreeConfig(4, 2, 2), TreeConfig(8, 2, 3)]
    rows = run_bench(pipe, prompts, trees, max_new_tokens=12, repeats=1, margins=[0.0],
                     lookups=[0])
    assert [r.setting for r in rows] == [PLAIN, "4,2,2", "8,2,3", AUTO, f"{AUTO} m=0",
                                         f"{AUTO} lookup=0"]
    assert pipe.session.lookup == 8  # the pipeline's own setting again
    assert all(r.identical and r.decoded == 2 * 11 for r in rows)  # 12 tokens, 1 from prefill
    assert rows[0].tokens_per_pass == 1.0 and rows[1].tokens_per_pass >= 1.0
    assert all(sum(r.trees_used.values()) == r.passes for r in rows[-3:])
    plain_split, tree_split = rows[0].pass_split_ms, rows[1].pass_split_ms
    assert plain_split[0] == 0 and plain_split[1] > 0 and min(tree_split) > 0
    table = format_table(rows)
    assert table.count("\n") == 7 and "| plain |" in table
    png = plot(rows, tmp_path / "bench.png", "tiny")
    with Image.open(png) as im:
        assert im.size[0] > 500


def test_interleaved_records_each_repeat_and_who_else_used_the_cpu(tiny_target, tiny_drafter):
    _, drafter_dir = tiny_drafter("eagle", "llava", 0)
    target = tiny_target("llava")[1]
    plain, spec = Pipeline(target), Pipeline(target, drafter_dir=drafter_dir, tree=TreeConfig(4, 2, 2))
    settings = [(BenchRow(PLAIN, None), lambda t, i: plain.generate(t, i, 8, draft=False)),
                (BenchRow("eagle", None), lambda t, i: spec.generate(t, i, 8))]
    rows = interleaved(settings, [("Describe the red boat.", [])], repeats=3)
    for row in rows:
        assert len(row.repeats) == len(row.others) == 3 and row.identical
        assert sum(d for d, _ in row.repeats) == row.decoded == 3 * 7
        assert all(cores >= 0 for cores in row.others)
    assert rows[0].speedup(rows[0]) == 1.0


def test_medians_take_the_quiet_repeats():
    row, base = BenchRow("x", None), BenchRow(PLAIN, None)
    row.repeats, base.repeats = [(10, 1.0), (10, 2.0), (30, 1.0)], [(10, 1.0), (10, 1.0), (10, 1.0)]
    row.others = base.others = [0.0, 1.5, 0.1]  # the second repeat was contended
    assert row.quiet() == [0, 2] and not row.contended()
    assert row.median_tokens_per_second() == 20.0  # median of 10 and 30, not of 10, 5, 30
    assert row.speedup(base) == 2.0
    row.others = [1.0, 1.0, 1.0]
    assert row.contended() and row.quiet() == [0, 1, 2]
    assert row.median_tokens_per_second() == 10.0
