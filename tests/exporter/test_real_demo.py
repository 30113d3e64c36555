"""What the real-LM demo prints reaches the screen as written."""
from rich.console import Console

from vispec.exporter.demo.real_demo import print_answer


def test_an_answer_line_keeps_its_brackets():
    """rich reads ``[...]`` as markup: unescaped, the expected answer vanished."""
    console = Console(record=True, width=200)
    print_answer(console, "image: 2 red circles, top left", "Two red circles [top left].")
    assert console.export_text() == ("[image: 2 red circles, top left] -> "
                                     "'Two red circles [top left].'\n")


def test_speed_table_times_like_bench_and_marks_contention(tiny_target, tiny_drafter, noise_image):
    from vispec.exporter.demo.real_demo import measure, print_speed
    from vispec.exporter.demo.synthetic_images import DETAIL_QUESTION, QUESTION, Scene
    from vispec.runtime.tree import TreeConfig

    scene = Scene(2, "red", "circle", "top left")
    image = noise_image(seed=5)
    prompts = [(QUESTION, [image], scene), (DETAIL_QUESTION, [image], scene),
               ("Describe the red boat.", [], None)]
    console = Console(record=True, width=200)
    results = measure(tiny_target("llava")[1], {"eagle": tiny_drafter("eagle", "llava", 0)[1]},
                      prompts, 8, TreeConfig(4, 2, 2), console, lambda msg: None, repeats=2)
    assert list(results) == ["image", "detailed", "text"]
    for rows in results.values():
        assert [r.setting for r in rows] == ["plain", "eagle"]
        assert all(len(r.repeats) == len(r.others) == 2 and r.identical for r in rows)
    text = console.export_text()
    assert "[image: Two red circles at the top left.] -> " in text
    assert "[image, detailed: Two red circles at the top left.] -> " in text
    rows = results["text"]
    rows[0].others = rows[1].others = [9.0, 9.0]  # as if another process had used 9 cores
    print_speed(results, console)
    table = console.export_text()
    assert "quiet repeats" in table and "0/2 contended" in table
    assert "text prompts contended: other processes used 9.00-9.00 cores" in table
