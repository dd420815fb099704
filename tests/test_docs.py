"""The README and docs/ as a newcomer uses them: every relative link resolves, the API example is the file
that runs here, the examples run, the test command is the one CI runs, every page's commands are run by CI
(.ci/docs_commands.py) or say why not, and the package metadata states the Python floor the README states."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    linked = {Path(t).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}


def test_readme_api_example_is_the_file_that_runs():
    readme = (ROOT / "README.md").read_text()
    usage = (ROOT / "python" / "usage.py").read_text()
    assert usage in _blocks(readme, "python")
    assert "[:, :-1]" not in usage  # a slice of a bigger logits buffer costs a copy in backward


@pytest.mark.parametrize("script", ["usage.py", "quickstart.py"])
def test_examples_run(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "python" / script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests = readme.split("## Tests", 1)[1]
    command = _blocks(tests, "bash")[0].strip().splitlines()
    assert any("pytest" in line for line in command) and not any("&&" in line for line in command)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    # the README's lines, consecutive and in order (the trainer pages' commands run after them)
    starts = [i for i in range(len(ci) - len(command) + 1) if ci[i:i + len(command)] == command]
    assert starts, f".ci/run does not run the README's test command {command}"


def test_python_floor_agrees():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'requires-python = ">=(3\.\d+)"', pyproject).group(1)
    assert f"Python {floor} or later" in (ROOT / "README.md").read_text()


def test_default_output_folder_is_ignored():
    from lens_kernels.train.config import TrainConfig

    ignored = (ROOT / ".gitignore").read_text().split()
    assert TrainConfig().out + "/" in ignored


def _docs_commands():
    spec = importlib.util.spec_from_file_location("docs_commands", ROOT / ".ci" / "docs_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_with_commands_runs_in_ci():
    runner = _docs_commands()
    with_commands = {str(p.relative_to(ROOT)) for p in PAGES if "```bash" in p.read_text()}
    assert with_commands <= set(runner.PAGES), f"pages whose commands CI never runs: {with_commands - set(runner.PAGES)}"
    assert "python .ci/docs_commands.py" in (ROOT / ".ci" / "run").read_text()
    for page in runner.PAGES:
        found = runner.blocks(page)
        assert found, f"{page} has no bash block left to run"
        for directive, argument, code in found:
            assert directive in (None, "skip", "expect-failure"), (page, directive)
            assert directive is None or len(argument) >= 10, f"{page}: a marker without its reason or text: {code[:60]!r}"
        assert any(directive != "skip" for directive, _, _ in found), f"{page}: every block skipped"


INLINE_COMMAND = re.compile(r"`(lens-train|lens-bench)((?: --?[a-z][-a-z0-9]*(?: [^-`\s][^`\s]*)?)*)`")


def test_inline_commands_parse():
    """Commands quoted in running text (the blocks run in CI): each parses with the CLI's own parser."""
    from lens_kernels.bench.cli import parse_args as bench_args
    from lens_kernels.train.config import build_parser

    parse = {"lens-train": lambda argv: build_parser().parse_args(argv), "lens-bench": bench_args}
    found = []
    for page in PAGES:
        for program, arguments in INLINE_COMMAND.findall(page.read_text()):
            argv = arguments.split()
            found.append((page.name, program, argv))
            try:
                parse[program](argv)
            except SystemExit as exc:  # --help exits 0; a bad option exits 2
                assert exc.code == 0, f"{page.name}: `{program} {arguments.strip()}` does not parse"
    assert any(argv for _, _, argv in found), found
