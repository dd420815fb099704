"""Run every ```bash block of the README and the docs/ pages that have them exactly as written, from the
root of a copy of this checkout, as a newcomer would: the README on the oldest Python it states.

    python .ci/docs_commands.py [README.md docs/trl.md ...]

Conventions a page may use, in an HTML comment on the line right before a block:

    <!-- ci: expect-failure "TEXT" -->  the block must exit non-zero with TEXT in its output: a step that
                                        needs a GPU, run on CI's CPU machine up to its own error
    <!-- ci: skip REASON -->            the block is not run (REASON, printed, says what runs it instead)

README.md starts from a bare shell: no venv, and `python3` on PATH is the Python floor of pyproject.toml
(`requires-python`, found as pythonX.Y on PATH, under pyenv, or given as LENS_DOCS_FLOOR_PYTHON; missing
is an error). Its install line makes its own venv and downloads torch from the package index as a
user's does (on Linux the CUDA build, about 5 GB installed). docs/backends.md and docs/benchmarks.md
continue where the README leaves a reader: in the README's venv, activated (the state its last block
exported), after the README's blocks pass.

The trainer pages assume torch in place. docs/verl.md runs in an empty venv that sees only this python's
torch and its requirements (linked in, see link_torch: unpacking a torch wheel per page costs minutes),
so its pip lines install everything else as a user's would (verl's transformers<5.11, for one, which
does not work next to the newer `kernels` package a newer transformers brings: a venv that sees CI's
packages would fail where a user's fresh one does not). docs/trl.md and docs/openrlhf.md run in venvs
made with --system-site-packages, which start empty but see CI's python (its torch, and TRL 1.16 and
OpenRLHF 0.11.2 as .ci/run installs them): their pip lines then install lens-kernels into the venv.
OpenRLHF's own install line needs CUDA and is marked skip (CI's CPU install of OpenRLHF is .ci/run's
--no-deps lines). pip's cache is reused.

The pages run side by side (the two that continue the README after it); a page's blocks run in order in
one shell state (variables exported by one block are seen by the next). The variables the pages use for
a model and data default to public ones; here they point at a tiny model and data made in code (no
download): MODEL_PATH, TRAIN_FILES, VAL_FILES. Every block has a timeout.
"""
import concurrent.futures
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/backends.md", "docs/benchmarks.md", "docs/trl.md", "docs/verl.md", "docs/openrlhf.md")
FROM_BARE_SHELL = "README.md"
AFTER_README = ("docs/backends.md", "docs/benchmarks.md")
SEES_SYSTEM_PACKAGES = ("docs/trl.md", "docs/openrlhf.md")
BLOCK_TIMEOUT = 600
MARKER = re.compile(r"<!--\s*ci:\s*(expect-failure|skip)\s*(.*?)\s*-->\s*$")


def blocks(page):
    """[(directive, argument, code)] for each ```bash block of a page, in order."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            directive, argument = None, ""
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.search(before)
            if match:
                directive, argument = match.group(1), match.group(2)
                if directive == "expect-failure":
                    argument = shlex.split(argument)[0]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append((directive, argument, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


def tiny_model_and_data(where):
    """A tiny Llama with its tokenizer (python/example_trl.py's, with a chat template) and a verl-style
    parquet data set, so that the pages' commands load a model and data without a download."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'python')!r})
import pandas as pd
from example_trl import tiny_model_and_tokenizer
model, tokenizer = tiny_model_and_tokenizer()
tokenizer.chat_template = "{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"
model.save_pretrained({str(where / 'model')!r}); tokenizer.save_pretrained({str(where / 'model')!r})
rows = [{{"data_source": "openai/gsm8k", "prompt": [{{"role": "user", "content": f"{{i}}+1="}}], "ability": "math",
         "reward_model": {{"style": "rule", "ground_truth": str(i + 1)}}, "extra_info": {{"index": i}}}}
        for i in range(8)]
pd.DataFrame(rows).to_parquet({str(where / 'train.parquet')!r})
pd.DataFrame(rows).to_parquet({str(where / 'val.parquet')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    return {"MODEL_PATH": str(where / "model"), "TRAIN_FILES": str(where / "train.parquet"),
            "VAL_FILES": str(where / "val.parquet")}


def link_torch(venv):
    """Put this python's torch and its requirements (their files and dist-info, nothing else) on the
    venv's path through a .pth file: the venv then has torch "in place", as the pages assume, and pip
    sees it installed, without unpacking a torch wheel per page."""
    from importlib.metadata import distribution, requires

    closure, todo = {}, ["torch"]
    while todo:
        name = re.match(r"[A-Za-z0-9_.-]+", todo.pop()).group(0)
        key = name.lower().replace("_", "-")
        if key in closure:
            continue
        closure[key] = distribution(name)
        todo += [r for r in (requires(name) or []) if "extra ==" not in r]
    links = venv / "torch-site"
    links.mkdir()
    for dist in closure.values():
        for top in {pathlib.PurePath(f).parts[0] for f in dist.files or ()}:
            source = pathlib.Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (links / top).exists():
                (links / top).symlink_to(source)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "lens-docs-torch.pth").write_text(str(links) + "\n")
    return closure["torch"].version


def checkout_copy(where):
    """A copy of this checkout's files (tracked and untracked-not-ignored): the pages' commands run from
    the root of a checkout and write there (pip's in-tree build, dist/, Hydra's outputs/), and the pages
    run side by side."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, where / name)
    return where


def floor_python():
    """(executable, version) of the oldest Python pyproject.toml allows, the one the README states."""
    floor = re.search(r'requires-python\s*=\s*">=\s*(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    candidates = [os.environ.get("LENS_DOCS_FLOOR_PYTHON"), shutil.which(f"python{floor}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(str(p) for p in pathlib.Path(pyenv_root).glob(f"versions/{floor}.*/bin/python{floor}"))
    candidates += [f"/usr/bin/python{floor}", f"/usr/local/bin/python{floor}"]
    for candidate in filter(None, candidates):
        try:  # a pyenv shim exists even where that version is not selected: ask the interpreter itself
            out = subprocess.run([candidate, "-c", "import sys, venv; print(sys.executable); print(sys.version.split()[0])"],
                                 capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if out.returncode == 0:
            executable, version = out.stdout.split()
            if version.startswith(floor + "."):
                return executable, version
    sys.exit(f"[docs] README.md runs on the Python floor {floor} (pyproject.toml's requires-python), and no "
             f"python{floor} with venv was found: install it, or name it in LENS_DOCS_FLOOR_PYTHON")


def run_page(page, work, data_env, after=None):
    """(failed block labels, the page's report, its last shell state): its blocks in order in one shell
    state. `after`: the state a page continues from (the README's venv activated); none: the page's own
    start (a bare shell on the floor Python for the README, a venv for the trainer pages)."""
    report = []
    checkout = checkout_copy(work / ("checkout-" + pathlib.Path(page).stem))

    def say(line):
        report.append(line)

    env = dict(os.environ, **data_env)
    env.pop("PYTHONPATH", None)  # an installed lens-kernels, not a path into this checkout
    env.pop("VIRTUAL_ENV", None)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    state = work / (pathlib.Path(page).stem + ".env")
    state.write_text(after.read_text() if after else "")
    if page == FROM_BARE_SHELL:
        executable, version = floor_python()
        floor_bin = work / "floor-bin"
        floor_bin.mkdir(exist_ok=True)
        for name in ("python3", "python"):
            if not (floor_bin / name).exists():
                (floor_bin / name).symlink_to(executable)
        env["PATH"] = f"{floor_bin}{os.pathsep}{env['PATH']}"
        say(f"[docs] {page}: a bare shell, python3 is Python {version} ({executable})")
    elif after is not None:
        say(f"[docs] {page}: in the README's venv, activated")
    else:
        venv = work / ("venv-" + pathlib.Path(page).stem)
        system = page in SEES_SYSTEM_PACKAGES
        subprocess.run([sys.executable, "-m", "venv", *(["--system-site-packages"] if system else []), str(venv)],
                       check=True, timeout=300)
        if not system:
            say(f"[docs] {page}: a fresh venv with this python's torch {link_torch(venv)}")
        env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    failures = []
    for number, (directive, argument, code) in enumerate(blocks(page), 1):
        label = f"{page} block {number}"
        if directive == "skip":
            say(f"[docs] {label}: skipped ({argument})")
            continue
        script = f"set -euo pipefail\nsource {shlex.quote(str(state))}\n{code}\nexport -p > {shlex.quote(str(state))}\n"
        start = time.monotonic()
        try:
            proc = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = None, f"timed out after {BLOCK_TIMEOUT} s\n" + str(exc.stdout or "") + str(exc.stderr or "")
        seconds = time.monotonic() - start
        if directive == "expect-failure":
            ok = rc not in (0, None) and argument in output
            want = f"a non-zero exit with {argument!r}"
        else:
            ok, want = rc == 0, "exit status 0"
        say(f"[docs] {label}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s (exit {rc}; wanted {want})")
        if not ok:
            failures.append(label)
            say(output[-6000:])
    return failures, "\n".join(report), state


def run_readme_then(pages, work, data_env, pool):
    """The README, then the pages that continue in its venv, side by side."""
    failures, report, state = run_page(FROM_BARE_SHELL, work, data_env)
    results = [(failures, report)]
    if failures:
        results += [([page], f"[docs] {page}: not run (the README failed)") for page in pages]
    else:
        results += [r[:2] for r in pool.map(lambda page: run_page(page, work, data_env, after=state), pages)]
    return results


def main(pages):
    start = time.monotonic()
    unknown = sorted(set(pages) - set(PAGES))
    if unknown:
        sys.exit(f"[docs] unknown pages {unknown}; this script runs {list(PAGES)}")
    with tempfile.TemporaryDirectory(prefix="lkdocs") as tmp:
        work = pathlib.Path(tmp)
        data_env = tiny_model_and_data(work)
        # side by side: most of the time is pip's downloads, lens-train, and verl's Ray start-up
        after = [page for page in pages if page in AFTER_README]
        if after and FROM_BARE_SHELL not in pages:
            sys.exit(f"[docs] {after} continue the README's venv: run them with README.md")
        alone = [page for page in pages if page not in AFTER_README and page != FROM_BARE_SHELL]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(pages)) as pool:
            chain = pool.submit(run_readme_then, after, work, data_env, pool) if FROM_BARE_SHELL in pages else None
            results = [r[:2] for r in pool.map(lambda page: run_page(page, work, data_env), alone)]
            if chain is not None:
                results = chain.result() + results
        failures = []
        for page_failures, report in results:
            print(report, flush=True)
            failures += page_failures
    print(f"[docs] {len(pages)} pages in {time.monotonic() - start:.0f} s", flush=True)
    if failures:
        sys.exit(f"[docs] failed: {', '.join(failures)}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(PAGES))
