"""Every code block in README.md and docs/*.md runs, and every command names a real file.

Conventions for the Markdown files (the tests below enforce them):

- Every fenced block names its language. Only ```python blocks are executed;
  ```bash / ```sh hold shell commands, ```text holds output, tables and
  equations.
- The ```python blocks of one page run in order, in one namespace, so a
  later block may use what an earlier one defined. Each page starts from a
  fresh namespace, in a fresh temporary working directory (blocks may write
  files there), with Keras's global state reset (dtype policy, distribution,
  session).
- A block whose first line is `# backend: tensorflow` (or `jax`, `torch`)
  runs only under that Keras backend; under the others it is left out, and
  nothing else is skipped. The whole file runs once per backend, in the
  per-backend runs of the test command.
- A page containing the comment `<!-- test_docs: own process -->` runs in a
  Python process of its own: for a page that sets something before its
  framework starts (JAX's device count, TensorFlow's threads). The other
  pages share one process, to pay for importing the frameworks once.
- A ```bash or ```sh line running `python examples/X.py` or
  `python -m module` must name an existing example or an importable module
  (the examples themselves run in tests/test_examples.py).

Run as a script (`python tests/test_docs.py PAGE...`), this file executes the
pages' Python blocks; the test starts it with the active backend.
"""

import importlib.util
import os
import re
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "sh", "text"}
OWN_PROCESS = "<!-- test_docs: own process -->"
BACKEND_MARKER = re.compile(r"#\s*backend:\s*(tensorflow|jax|torch)\s*$")
FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")
# The limit: the README stays a front page, the detail lives in docs/.
README_MAX_BYTES = 20_000


def fenced_blocks(path):
    """[(first code line, 1-based; info string; code)] of every fenced block in `path`."""
    blocks, lines = [], Path(path).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks, info = opening.groups()
        body, i = [], i + 1
        start = i + 1
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start - 1}: a fence that is never closed")
        blocks.append((start, info.strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def _relative(path):
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- The Markdown itself: no backend needed ------------------------------------

@pytest.mark.backend_independent
@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_block_names_its_language(page):
    for line, info, _ in fenced_blocks(page):
        assert info in LANGUAGES, (
            f"{_relative(page)}:{line}: a fenced block must say ```python (run by this test), "
            f"```bash/```sh or ```text; found ```{info}")


@pytest.mark.backend_independent
def test_shell_commands_name_existing_examples_and_modules():
    checked = 0
    for page in PAGES:
        for line, info, code in fenced_blocks(page):
            if info not in ("bash", "sh"):
                continue
            for command in re.split(r"&&|\n|;", code):
                words = shlex.split(command, comments=True)
                for i, word in enumerate(words[:-1]):
                    if word != "python":
                        continue
                    target = words[i + 1]
                    where = f"{_relative(page)}:{line}: {command.strip()}"
                    if target == "-m":
                        module = words[i + 2]
                        assert importlib.util.find_spec(module) is not None, where
                        checked += 1
                    elif target.endswith(".py"):
                        assert (ROOT / target).is_file(), where
                        checked += 1
    assert checked >= 5  # the Quickstart's, the examples', the benchmark's


@pytest.mark.backend_independent
def test_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= README_MAX_BYTES


@pytest.mark.backend_independent
def test_the_readme_test_command_is_what_ci_runs():
    # The Quickstart says `.ci/run` runs exactly its second line.
    quickstart = [code for _, info, code in fenced_blocks(ROOT / "README.md")
                  if info == "bash" and "pip install -e ." in code][0]
    command = quickstart.splitlines()[1].split("   #")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [line.strip() for line in ci]


@pytest.mark.backend_independent
@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_relative_links_resolve(page):
    text = Path(page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file, _, anchor = target.partition("#")
        linked = Path(page).parent / file
        assert linked.exists(), f"{_relative(page)}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_relative(page)}: no heading for {target}"


def _anchors(page):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped."""
    headings = re.findall(r"^#+\s+(.*)$", Path(page).read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


# --- The Python blocks: once per backend ----------------------------------------

def _runs():
    shared = [p for p in PAGES if OWN_PROCESS not in p.read_text(encoding="utf-8")]
    alone = [p for p in PAGES if p not in shared]
    return [pytest.param(shared, id="shared")] + [
        pytest.param([p], id=_relative(p)) for p in alone]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("pages", _runs())
def test_python_blocks_run(pages):
    from helpers import run_python  # imports keras: only in pytest's process

    result = run_python(__file__, *pages, timeout=300)
    ran = result.stdout.count("test_docs: ran ")
    assert ran > 0 or all(_only_for_other_backends(p) for p in pages), result.stdout


def _only_for_other_backends(page):
    import keras

    blocks = [code for _, info, code in fenced_blocks(page) if info == "python"]
    return all(_backend_of(code) not in (None, keras.backend.backend()) for code in blocks)


def _backend_of(code):
    marker = BACKEND_MARKER.match(code.splitlines()[0]) if code.strip() else None
    return marker.group(1) if marker else None


def _reset_keras():
    """Keras's global state back to its defaults between pages."""
    keras = sys.modules.get("keras")
    if keras is None:
        return
    keras.config.set_dtype_policy("float32")
    keras.distribution.set_distribution(None)
    keras.backend.clear_session()


def run_pages(pages):
    """Runs each page's ```python blocks in order, one namespace per page."""
    backend = os.environ["KERAS_BACKEND"]
    for page in [Path(p).resolve() for p in pages]:
        with tempfile.TemporaryDirectory() as workdir:
            os.chdir(workdir)
            namespace = {"__name__": "__main__"}
            for line, info, code in fenced_blocks(page):
                if info != "python":
                    continue
                if _backend_of(code) not in (None, backend):
                    print(f"test_docs: left out {_relative(page)}:{line} (not {backend})")
                    continue
                # Padded so that a traceback names the line in the Markdown file.
                compiled = compile("\n" * (line - 1) + code, _relative(page), "exec")
                try:
                    exec(compiled, namespace)
                except BaseException:
                    traceback.print_exc()
                    print(f"test_docs: FAILED {_relative(page)}:{line}", flush=True)
                    return 1
                print(f"test_docs: ran {_relative(page)}:{line}", flush=True)
            os.chdir(ROOT)
        _reset_keras()
    return 0


if __name__ == "__main__":
    sys.exit(run_pages(sys.argv[1:]))
