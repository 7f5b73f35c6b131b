"""The image's build context (which files Docker receives, and the tag that hashes them), the registry token exchange
and the app settings' variable names, as units; what the program declares with them: test_program_image.py."""

import shutil
from pathlib import Path

import pytest

from inference_app.settings import environment_variables
from infra.dockerignore import context_files
from infra.image import BUILD_CONTEXT, PROJECT_DIR, image_tag
from infra.image_config import SETTINGS_ENV


# -- the build context hash ----------------------------------------------------------------------------------------
@pytest.fixture
def repository_copy(tmp_path: Path) -> Path:
    """A copy of inference_app/ in a scratch repository with an unrelated file beside it."""
    shutil.copytree(
        PROJECT_DIR / BUILD_CONTEXT, tmp_path / "inference_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "README.md").write_text("# readme\n")
    return tmp_path


def test_tag_changes_with_a_file_of_inference_app_only(repository_copy: Path) -> None:
    context = repository_copy / "inference_app"
    original = image_tag(context, "linux/amd64")
    assert original == image_tag(PROJECT_DIR / BUILD_CONTEXT, "linux/amd64")  # the copy is the same context

    (repository_copy / "README.md").write_text("# readme, edited\n")
    (repository_copy / "infra").mkdir()
    (repository_copy / "infra" / "new.py").write_text("x = 1\n")
    assert image_tag(context, "linux/amd64") == original

    (context / "__pycache__").mkdir(exist_ok=True)
    (context / "__pycache__" / "settings.cpython-311.pyc").write_bytes(b"\x00compiled")
    assert image_tag(context, "linux/amd64") == original  # .dockerignore'd: never sent to Docker

    settings = context / "settings.py"
    settings.write_text(settings.read_text() + "\n# a change\n")
    changed = image_tag(context, "linux/amd64")
    assert changed != original

    (context / "Dockerfile").write_text((context / "Dockerfile").read_text() + "\n# a change\n")
    assert image_tag(context, "linux/amd64") not in (original, changed)


def test_tag_depends_on_the_platform(repository_copy: Path) -> None:
    context = repository_copy / "inference_app"
    assert image_tag(context, "linux/amd64") != image_tag(context, "linux/arm64")


def _context(tmp_path: Path, dockerignore: str, files: list[str]) -> Path:
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / ".dockerignore").write_text(dockerignore)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    return tmp_path


def test_dockerignore_rules_are_dockers(tmp_path: Path) -> None:
    files = ["app.py", "notes.md", "docs/guide.md", "docs/keep.md", "a/b/cache.pyc", "build/out.bin", "x/build/y"]
    rules = "\n".join(
        [
            "# comment lines are ignored",
            "*.md",  # top level only: `*` does not cross `/`
            "docs",  # a folder excludes everything under it
            "!docs/keep.md",  # a later exception wins
            "**/*.pyc",  # any depth
            "/build/",  # leading and trailing slashes are cleaned away
            "Dockerfile",  # the Dockerfile is still sent
        ]
    )
    context = _context(tmp_path, rules, files)
    assert list(context_files(context)) == [".dockerignore", "Dockerfile", "app.py", "docs/keep.md", "x/build/y"]


def test_a_context_without_dockerfile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Dockerfile"):
        list(context_files(tmp_path))


# -- app settings --------------------------------------------------------------------------------------------------
def test_variable_names_are_the_ones_the_app_reads() -> None:
    read_by_app = set(environment_variables().values())
    assert set(SETTINGS_ENV.values()) - read_by_app == {"INFERENCE_MODEL_REVISION"}
    assert "INFERENCE_MODEL_REVISION" not in read_by_app  # so it can never change the app's behaviour
