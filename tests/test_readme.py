"""The README's ecosystem examples, run verbatim."""
import pathlib
import re

import pytest
import torch
import torchvision

import fastres

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _ecosystem_examples():
    text = README.read_text()
    section = text[text.index("## Ecosystems"):]
    section = section[:section.index("\n## ", 3)]
    examples = []
    for heading, body in re.findall(r"### ([^\n]+)\n(.*?)(?=\n### |\Z)", section, re.S):
        for code in re.findall(r"```python\n(.*?)```", body, re.S):
            examples.append(pytest.param(code, id=heading.split(":")[0].split(" ")[0].lower()))
    return examples


EXAMPLES = _ecosystem_examples()


def test_every_ecosystem_has_a_two_line_example():
    assert len(EXAMPLES) >= 6
    for example in EXAMPLES:
        assert len(example.values[0].strip().splitlines()) == 2, example.values[0]


@pytest.mark.parametrize("code", EXAMPLES)
def test_readme_example_runs(code, tmp_path, monkeypatch):
    namespace = {"torch": torch, "torchvision": torchvision, "fastres": fastres}
    if "timm." in code:
        namespace["timm"] = pytest.importorskip("timm")
    if "transformers." in code:
        namespace["transformers"] = pytest.importorskip("transformers")
    if "onnx" in code:
        pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)
    if "fastres.convert(model)" in code:
        report = fastres.convert_report(namespace["model"])
        assert report.blocks > 0 and report.convs_fused > 0, str(report)
