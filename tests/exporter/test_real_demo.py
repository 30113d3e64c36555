"""What the real-LM demo prints reaches the screen as written."""
from rich.console import Console

from vispec.exporter.real_demo import print_answer


def test_an_answer_line_keeps_its_brackets():
    """rich reads ``[...]`` as markup: unescaped, the expected answer vanished."""
    console = Console(record=True, width=200)
    print_answer(console, "image: 2 red circles, top left", "Two red circles [top left].")
    assert console.export_text() == ("[image: 2 red circles, top left] -> "
                                     "'Two red circles [top left].'\n")
