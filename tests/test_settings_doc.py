"""The README's settings table is the one the code generates: settings are written down once."""

from pathlib import Path

from edge.settings import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_every_setting_as_the_code_describes_it():
    text = README.read_text()
    block = text.split("<!-- settings:start -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block.strip() == markdown_table().strip(), "run: python -m edge.settings, paste into README.md"
