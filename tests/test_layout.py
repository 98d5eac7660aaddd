"""The house plan holds: the wings of kandinsky5/ import in one direction (model and encoders at the
bottom, the pipelines above them, the CLI and the scripts on top), and the model-agnostic packages
import nothing of kandinsky5/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each wing, and the wings (and project packages) it may import.
ALLOWED = {
    "kandinsky5.model": {"kandinsky5.model", "modules"},
    "kandinsky5.encoders": {"kandinsky5.model", "kandinsky5.encoders", "modules"},
    "kandinsky5.inference": {"kandinsky5.model", "kandinsky5.encoders", "kandinsky5.inference", "modules", "networks"},
    "kandinsky5.caching": {
        "kandinsky5.model",
        "kandinsky5.encoders",
        "kandinsky5.inference",
        "kandinsky5.caching",
        "modules",
        "dataset",
    },
    "kandinsky5.captioning": {
        "kandinsky5.model",
        "kandinsky5.encoders",
        "kandinsky5.captioning",
        "modules",
        "dataset",
    },
    "kandinsky5.training": {
        "kandinsky5.model",
        "kandinsky5.encoders",
        "kandinsky5.inference",
        "kandinsky5.training",
        "modules",
        "dataset",
        "networks",
    },
    "kandinsky5.gui": {
        "kandinsky5",
        "kandinsky5.gui",
        "kandinsky5.model",
        "kandinsky5.encoders",
        "kandinsky5.inference",
        "kandinsky5.caching",
        "kandinsky5.captioning",
        "kandinsky5.training",
        "modules",
        "dataset",
        "networks",
        "kandinsky5_generate_video",
    },
    "modules": {"modules"},
    "dataset": {"dataset", "modules"},
    "networks": {"networks", "modules"},
}
PROJECT = ("kandinsky5", "modules", "dataset", "networks")


def package_of(module: str) -> str:
    """The wing (kandinsky5.<wing>) or project package a dotted module name belongs to."""
    parts = module.split(".")
    if parts[0] == "kandinsky5" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def project_imports(path: Path, package: str) -> set[str]:
    """The project modules ``path`` (a module of ``package``) imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            names.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in PROJECT}


def test_each_wing_imports_only_itself_and_what_lies_below_it():
    checked, wrong = 0, []
    for package, allowed in ALLOWED.items():
        folder = ROOT / package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            checked += 1
            for name in project_imports(path, package):
                if package_of(name) not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert checked > 30
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above would catch a model file importing a wing above it, written either way."""
    sample = tmp_path / "dit.py"
    sample.write_text("from kandinsky5.inference.sampling import sample_euler\nfrom ..training import train\n")
    found = project_imports(sample, "kandinsky5.model")
    assert found == {"kandinsky5.inference.sampling", "kandinsky5.training"}
    assert not {package_of(name) for name in found} & ALLOWED["kandinsky5.model"]


def test_every_wing_says_what_it_holds():
    for package in ALLOWED:
        if package.startswith("kandinsky5."):
            init = ROOT / package.replace(".", "/") / "__init__.py"
            assert len(ast.get_docstring(ast.parse(init.read_text())) or "") > 40, init
