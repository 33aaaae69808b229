"""``make demo``'s comparison table: measured as the README's table is (same command, same
thread setting), and it says what its ratio is."""
import re
from pathlib import Path

from reference.compare import Row, format_table

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_runs_the_readme_tables_command():
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    (command,) = re.findall(r"-m (reference\.compare.*)", recipe)
    assert "--threads 1" in command
    assert f"(`python -m {command.strip()}`)" in (ROOT / "README.md").read_text()


def test_the_table_says_its_ratio_is_scratch_over_torch():
    table = format_table([Row("x", 1e-9, 0.5, 0.25)]).splitlines()
    assert table[0].split()[-1] == "scratch/torch"
    assert table[2].split()[-1] == "2.00"                      # 0.5 / 0.25
    assert table[-1].startswith("scratch/torch = scratch s / torch s")
