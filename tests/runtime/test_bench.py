"""The bench runs every setting on the same prompts, checks identity, and charts the sweep."""
from PIL import Image

from vispec.runtime.bench import AUTO, PLAIN, format_table, plot, run_bench
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.tree import TreeConfig


def test_bench_rows_table_and_chart(tiny_target, tiny_drafter, noise_image, tmp_path):
    _, drafter_dir = tiny_drafter("vispec", "llava", 0)
    pipe = Pipeline(tiny_target("llava")[1], drafter_dir=drafter_dir)
    prompts = [("Describe the red boat.", []), ("What is this?", [noise_image(56, 56, 1)])]
    trees = [TreeConfig(4, 2, 2), TreeConfig(8, 2, 3)]
    rows = run_bench(pipe, prompts, trees, max_new_tokens=12, repeats=1)
    assert [r.setting for r in rows] == [PLAIN, "4,2,2", "8,2,3", AUTO]
    assert all(r.identical and r.decoded == 2 * 11 for r in rows)  # 12 tokens, 1 from prefill
    assert rows[0].tokens_per_pass == 1.0 and rows[1].tokens_per_pass >= 1.0
    assert sum(rows[-1].trees_used.values()) == rows[-1].passes
    plain_split, tree_split = rows[0].pass_split_ms, rows[1].pass_split_ms
    assert plain_split[0] == 0 and plain_split[1] > 0 and min(tree_split) > 0
    table = format_table(rows)
    assert table.count("\n") == 5 and "| plain |" in table
    png = plot(rows, tmp_path / "bench.png", "tiny")
    with Image.open(png) as im:
        assert im.size[0] > 500
