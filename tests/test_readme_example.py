import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_standalone_example_runs_and_confines_the_edit():
    section = README.read_text().split("## Standalone use", 1)[1]
    namespace = {}
    for code in re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S):
        # Running the README's own code blocks is the point: the example users copy must work as written.
        # The code is the repository's, never user input, and tests/ is not part of the node pack.
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    change, inside = namespace["change"], namespace["inside"]
    assert change[inside].mean() > 1.0
    assert change[~inside].mean() < 0.1 * change[inside].mean()
    source, dog_edit, ngdm_dog_edit = namespace["source"], namespace["dog_edit"], namespace["ngdm_dog_edit"]
    assert (namespace["edit"](namespace["model"], namespace["inversion"], "cat") - source).abs().max() < 1e-5
    for result in (dog_edit, ngdm_dog_edit):
        change = (result - source).abs().mean(dim=1)[0]
        assert change[inside].mean() > 1.0 and change[~inside].mean() < 1e-6
