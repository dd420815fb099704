"""Run every ```bash block of the trainer pages (docs/trl.md, docs/verl.md, docs/openrlhf.md) exactly as
written, from the root of a copy of this checkout, each page in its own fresh virtual environment.

    python .ci/docs_commands.py [docs/trl.md ...]

Conventions a page may use, in an HTML comment on the line right before a block:

    <!-- ci: expect-failure "TEXT" -->  the block must exit non-zero with TEXT in its output: a step that
                                        needs a GPU, run on CI's CPU machine up to the trainer's own error
    <!-- ci: skip REASON -->            the block is not run (REASON is printed); for pure reference

The pages assume torch in place. docs/verl.md runs in an empty venv that sees only this python's torch
and its requirements (linked in, see link_torch: unpacking a torch wheel per page costs minutes), so
its pip lines install everything else as a user's would (verl's transformers<5.11, for one, which
does not work next to the newer `kernels` package a newer transformers brings: a venv that sees CI's
packages would fail where a user's fresh one does not). docs/trl.md and docs/openrlhf.md run in venvs
made with --system-site-packages, which start empty but see CI's python (its torch, and TRL 1.16 and
OpenRLHF 0.11.2 as .ci/run installs them): their pip lines then install lens-kernels into the venv.
OpenRLHF's own install line needs CUDA and is marked skip (CI's CPU install of OpenRLHF is .ci/run's
--no-deps lines). pip's cache is reused.

The pages run side by side; a page's blocks run in order in one shell state (variables exported by
one block are seen by the next). The variables the pages use for a model and data default to public
ones; here they point at a tiny model and data made in code (no download): MODEL_PATH, TRAIN_FILES,
VAL_FILES. Every block has a timeout.
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
PAGES = ("docs/trl.md", "docs/verl.md", "docs/openrlhf.md")
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


def run_page(page, work, data_env):
    """(failed block labels, the page's report): its blocks in order in one venv."""
    report = []
    checkout = checkout_copy(work / ("checkout-" + pathlib.Path(page).stem))

    def say(line):
        report.append(line)

    venv = work / ("venv-" + pathlib.Path(page).stem)
    system = page in SEES_SYSTEM_PACKAGES
    subprocess.run([sys.executable, "-m", "venv", *(["--system-site-packages"] if system else []), str(venv)],
                   check=True, timeout=300)
    if not system:
        say(f"[docs] {page}: a fresh venv with this python's torch {link_torch(venv)}")
    state = work / (pathlib.Path(page).stem + ".env")
    env = dict(os.environ, **data_env)
    env.pop("PYTHONPATH", None)  # the venv's installed lens-kernels, not a path into this checkout
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
               PIP_DISABLE_PIP_VERSION_CHECK="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    state.write_text("")
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
    return failures, "\n".join(report)


def main(pages):
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lkdocs") as tmp:
        work = pathlib.Path(tmp)
        data_env = tiny_model_and_data(work)
        # the pages run side by side: most of their time is pip's downloads and verl's Ray start-up
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(pages)) as pool:
            results = list(pool.map(lambda page: run_page(page, work, data_env), pages))
        failures = []
        for page_failures, report in results:
            print(report, flush=True)
            failures += page_failures
    print(f"[docs] {len(pages)} pages in {time.monotonic() - start:.0f} s", flush=True)
    if failures:
        sys.exit(f"[docs] failed: {', '.join(failures)}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(PAGES))
