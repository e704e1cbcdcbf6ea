"""tools/plant_bugs.py plants each bug by replacing a text that must occur exactly once in its file: a refactor that
moves the text leaves the tool checking nothing (it stops at the first such bug), and no other test runs it."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_planted_bug_finds_its_text_once_and_names_tests_that_exist():
    spec = importlib.util.spec_from_file_location("plant_bugs", ROOT / "tools" / "plant_bugs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for name, file, old, _, tests in tool.BUGS:
        assert (ROOT / file).read_text().count(old) == 1, f"{name}: {old!r} is not once in {file}"
        for test in tests:
            path, function = test.split("::")
            assert f"def {function.split('[')[0]}(" in (ROOT / path).read_text(), f"{name}: no test {test}"
