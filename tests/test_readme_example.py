import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_standalone_example_runs_and_confines_the_edit():
    section = README.read_text().split("## Standalone use", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    change, inside = namespace["change"], namespace["inside"]
    assert change[inside].mean() > 1.0
    assert change[~inside].mean() < 0.1 * change[inside].mean()
