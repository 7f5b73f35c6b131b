"""The architecture as the imports show it: torch, transformers and peft only under inference_app/engine/ and
inference_app/demo/; no import cycles among the app's and the program's modules; the settings module (which
`pulumi up` imports) light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
MAY_IMPORT_HEAVY = ("inference_app/engine/", "inference_app/demo/")


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of inference_app/ and infra/."""
    modules = {}
    for path in sorted([*(ROOT / "inference_app").rglob("*.py"), *(ROOT / "infra").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(path: Path) -> set[str]:
    """Every module the file imports, at any level of the file (function bodies and TYPE_CHECKING blocks too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule, maybe
    return names


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_engine_and_the_demo_import_torch_transformers_or_peft(module: str) -> None:
    relative = MODULES[module].relative_to(ROOT).as_posix()
    heavy = sorted(name for name in _imported(MODULES[module]) if name.split(".")[0] in HEAVY)
    assert relative.startswith(MAY_IMPORT_HEAVY) or not heavy, f"{relative} imports {heavy}"


def test_no_import_cycles() -> None:
    graph = {module: sorted(_imported(path) & MODULES.keys()) for module, path in MODULES.items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        visiting.append(module)
        for imported in graph[module]:
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_settings_and_the_program_import_nothing_heavy() -> None:
    """`pulumi up` imports infra/ and with it inference_app.settings: torch there would slow every run."""
    code = (
        "import sys, inference_app.settings, infra.access, infra.image_config\n"
        f"print(sorted(name for name in sys.modules if name.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
