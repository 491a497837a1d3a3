"""The documentation cannot rot: README.md and every page under docs/ are executed and checked.

* Every ```python block runs.  The blocks of one page run in order in one shared namespace (like
  a doctest session), in a fresh temporary working directory, with torch, NumPy and Python's
  generators seeded with 0, after the page's set-up hook from ``tests/docs_setup.py`` (if any).
* Every shell command shown in a ```bash block is run here (``RUN_HERE``: in the page's working
  directory, at its place among the page's blocks), or is run elsewhere by CI (``RUN_ELSEWHERE``:
  the file that runs it and a string that shows it does), or its block is preceded by a line
  saying that it needs a GPU or a download (``MARKER``).
* The command-line page lists exactly the commands and flags that ``--help`` lists.
* The API reference lists every public name, and every public name's docstring has its sections.
* README.md stays a front door (at most 200 lines); no page refers to internal issue numbers.

Pages are found by glob, so a page added later is covered without touching this file.
"""

import ast
import importlib
import inspect
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from docs_setup import SETUP

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
#: A shell block that no test runs must follow a line that says why it cannot run here.
MARKER = re.compile(r"needs (a GPU|a CUDA device|downloaded weights|a download)", re.I)

#: Commands the docs show and this file runs itself, in the page's working directory.
RUN_HERE = {
    "python -m ag_kernels --help",
    "python -m ag_kernels generate --help",
    "python -m ag_kernels generate --net main.pt --gnet guide.pt --seeds 0-63 --guidance 2.1 --outdir out",
    # docs/schedules.md: a small tuning run on the toy models, then generate with its schedule and with inline levels.
    "python -m ag_kernels tune-schedule --net main.pt --gnet guide.pt --guidance 3 --solver dpmpp_3m --steps 10 "
    "--sigma-min 0.005 --sigma-max 5 --shape 2 --seeds 1000000-1000255 --reference-steps 32 --max-trials 20 "
    "--out tuned.json",
    "python -m ag_kernels generate --net main.pt --gnet guide.pt --guidance 3 --solver dpmpp_3m --sigmas tuned.json "
    "--shape 2 --seeds 0-1023",
    "python -m ag_kernels generate --net main.pt --sigmas 80,10,1,0.1 --solver dpmpp_2m --shape 2",
    # docs/unipc.md, on its stand-in networks.
    "python -m ag_kernels generate --net main.pt --gnet guide.pt --seeds 0-63 --steps 10 --guidance 2 --solver unipc",
}
#: Commands the docs show that CI runs elsewhere: command -> [(file, a string of that file that runs it), ...].
RUN_ELSEWHERE = {
    "pip install torch==2.13.0 ninja setuptools && pip install --no-build-isolation -e . && python -m ag_kernels demo": [
        (".ci/run", "pip install --quiet torch==2.13.0 ninja setuptools"),
        (".ci/run", "pip install --quiet --no-build-isolation -e"),
        ("tests/test_toy_experiment.py", 'main(["demo"'),
    ],
    'pip install torch==2.13.0 ninja setuptools && pip install --no-build-isolation -e ".[test]" && python -m pytest tests': [
        (".ci/run", "pip install --quiet torch==2.13.0 ninja setuptools"),
        (".ci/run", "pip install --quiet --no-build-isolation -e \".[test,docs]\""),
        (".ci/run", "python -m pytest tests"),
    ],
    'pip install --no-build-isolation -e ".[docs]" && mkdocs build --strict': [
        (".ci/run", "pip install --quiet --no-build-isolation -e \".[test,docs]\""),
        (".ci/run", "mkdocs build --strict"),
    ],
    # docs/gpu.md: the offline compile check alone; CI runs it with the whole suite.
    "python -m pytest tests/test_triton_compile.py": [(".ci/run", "python -m pytest tests"),
                                                      ("tests/test_triton_compile.py", "def test_")],
    # The standard profile is the smoke profile's runner at full sizes.
    "python -m bench": [("tests/test_bench_smoke.py", '"-m", "bench", "--smoke"')],
    "python -m bench --smoke": [("tests/test_bench_smoke.py", '"-m", "bench", "--smoke"')],
    "python -m pytest bench --benchmark-only -k euler": [("tests/test_bench_smoke.py", '"--benchmark-only"')],
    # conftest.py reads AG_TEST_SEED on every run; test_seed_forms_parse checks these three values.
    "AG_TEST_SEED=123 python -m pytest tests": [("tests/conftest.py", 'os.environ.get("AG_TEST_SEED")')],
    "AG_TEST_SEED=1-50 python -m pytest tests -k ...": [("tests/conftest.py", 'os.environ.get("AG_TEST_SEED")')],
    "AG_TEST_SEED=random python -m pytest tests": [("tests/conftest.py", 'os.environ.get("AG_TEST_SEED")')],
}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path):
    """The fenced blocks of a page: [(language, code, first line number, the paragraph before it)]."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        before, j = [], i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        while j >= 0 and lines[j].strip() and not FENCE.match(lines[j]):
            before.insert(0, lines[j].strip())
            j -= 1
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel(path)}:{len(lines)}: a ``` block is not closed")
        found.append((lang.lower(), "\n".join(body) + "\n", start, " ".join(before)))
        i += 1
    return found


def commands(code: str):
    """The commands of a shell block: one per line, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in code.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        line = line[2:] if line.startswith("$ ") else line  # a console prompt
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+", " ", line))
    return out


def _run_command(command: str, where: str):
    """Run a shown command: ``python -m ag_kernels ...`` in this process (its entry point, without
    the seconds of a fresh torch import), anything else in a subprocess."""
    argv = command.split()
    if argv[:3] == ["python", "-m", "ag_kernels"]:
        from ag_kernels.commands.main import main

        try:
            code = main(argv[3:])
        except SystemExit as exc:  # --help
            code = exc.code
        assert code in (0, None), f"{where}: {command} exited {code}"
        return
    proc = subprocess.run([sys.executable if argv[0] == "python" else argv[0], *argv[1:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}: {command}\n{proc.stdout}\n{proc.stderr}"


def run_page(path: Path, monkeypatch, workdir: Path):
    """Run a page's python blocks (and its RUN_HERE commands) in order in one namespace; the namespace."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    hook = SETUP.get(rel(path) if path.is_relative_to(ROOT) else path.name)
    if hook is not None:
        hook(monkeypatch)
    namespace = {"__name__": "__docs__"}
    for lang, code, line, _ in blocks(path):
        where = f"{path.name}:{line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs' own examples
        elif lang in SHELL:
            for command in commands(code):
                if command in RUN_HERE:
                    _run_command(command, where)
    return namespace


PAGES_WITH_CODE = [p for p in PAGES if any(lang == "python" or (lang in SHELL and set(commands(code)) & RUN_HERE)
                                          for lang, code, _, _ in blocks(p))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[rel(p) for p in PAGES_WITH_CODE])
def test_page_examples_run(page, monkeypatch, tmp_path):
    run_page(page, monkeypatch, tmp_path)


def test_examples_found():
    """The collection finds the examples (a parser that found none would pass every page vacuously)."""
    python = {rel(p): sum(lang == "python" for lang, *_ in blocks(p)) for p in PAGES}
    assert python["README.md"] >= 1 and python["docs/ops.md"] >= 3 and python["docs/sampler.md"] >= 3, python


def test_setup_hooks_name_pages_and_run(tmp_path, monkeypatch):
    for key in SETUP:
        assert (ROOT / key).is_file(), f"tests/docs_setup.py: SETUP key {key!r} names no page"
    # The mechanism itself: a hook patches what a page's blocks then see.
    page = tmp_path / "page.md"
    page.write_text("```python\nimport json\nvalue = json.loads('[1]')\n```\n\n```python\nassert value == 'patched'\n```\n")
    monkeypatch.setitem(SETUP, "page.md", lambda mp: mp.setattr("json.loads", lambda text: "patched"))
    assert run_page(page, monkeypatch, tmp_path)["value"] == "patched"


def unrun_commands(pages):
    """(every shell command the pages show, the problems: commands neither run by a test nor marked)."""
    shown, problems = set(), []
    for page in pages:
        for lang, code, line, before in blocks(page):
            if lang not in SHELL:
                continue
            for command in commands(code):
                shown.add(command)
                if MARKER.search(before) or command in RUN_HERE or command in RUN_ELSEWHERE:
                    continue
                problems.append(f"{page.name}:{line}: {command!r} is neither run by a test nor marked "
                                f"(a line before the block saying it needs a GPU or a download)")
    return shown, problems


def test_unrun_commands_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run:\n\n```bash\n$ python -m ag_kernels --help\npython -m ag_kernels demo --n 3 \\\n  --no-png\n```\n\n"
                    "This needs a GPU:\n\n```bash\npython -m bench --gpu\n```\n")
    shown, problems = unrun_commands([page])
    assert shown == {"python -m ag_kernels --help", "python -m ag_kernels demo --n 3 --no-png", "python -m bench --gpu"}
    assert len(problems) == 1 and "demo --n 3 --no-png" in problems[0], problems


def test_shell_commands_are_run_or_marked():
    shown, problems = unrun_commands(PAGES)
    assert not problems, "\n".join(problems)
    assert not (RUN_HERE | set(RUN_ELSEWHERE)) - shown, "listed commands no page shows any more"
    for command, evidence in RUN_ELSEWHERE.items():
        for file, text in evidence:
            assert text in (ROOT / file).read_text(encoding="utf-8"), f"{command!r}: {file} does not contain {text!r}"


def test_seed_forms_parse():
    from conftest import _seeds

    assert _seeds("123") == [123] and _seeds("1-50") == list(range(1, 51)) and _seeds("random") == [None]


def test_readme_is_a_front_door_and_no_issue_numbers():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(r"\bissues?[\s-]*#?\d", line, re.I), f"{rel(page)}:{n}: {line.strip()}"


# --- the command line page against --help ---------------------------------------------------------

CLI_COMMANDS = {"demo": ["demo"], "toy train": ["toy", "train"], "selfcheck": ["selfcheck"],
                "generate": ["generate"], "tune-schedule": ["tune-schedule"], "verify": ["verify", "--edm2", "x"],
                "verify --generate": ["verify", "--edm2", "x", "--generate"]}


def _help(argv, capsys, monkeypatch):
    from ag_kernels.commands.main import main

    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _flags(help_text):
    options = help_text.split("options:", 1)[1]
    return {flag for line in options.splitlines() if re.match(r"  -", line)
            for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", re.split(r"\s{2,}", line.strip())[0])} - {"--help"}


def _doc_sections():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = {}
    for title, body in re.findall(r"^## `python -m ag_kernels ([^`]+)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        rows = [row.split("|")[1] for row in body.splitlines() if row.startswith("| `")]
        sections[title] = {flag for cell in rows for flag in re.findall(r"--[A-Za-z][\w-]*", cell)}
    table = text.split("## ", 1)[0]
    listed = {row.split("`")[1] for row in table.splitlines() if row.startswith("| `")}
    return listed, sections


def test_cli_page_lists_what_help_lists(capsys, monkeypatch):
    listed, sections = _doc_sections()
    top = _help([], capsys, monkeypatch)
    subcommands = set(re.search(r"\{([\w,-]+)\}", top).group(1).split(","))
    assert {c.split()[0] for c in listed} == subcommands, (listed, subcommands)
    toy = set(re.search(r"\{([\w,-]+)\}", _help(["toy"], capsys, monkeypatch)).group(1).split(","))
    assert {c.split()[1] for c in listed if c.startswith("toy ")} == toy
    assert set(sections) == set(CLI_COMMANDS), sorted(sections)
    for name, argv in CLI_COMMANDS.items():
        helped = _flags(_help(argv, capsys, monkeypatch))
        assert helped, name
        assert sections[name] == helped, (f"docs/cli.md `{name}`: missing {sorted(helped - sections[name])}, "
                                          f"not in --help {sorted(sections[name] - helped)}")


# --- the API reference and the docstrings ---------------------------------------------------------

import ag_kernels  # noqa: E402

PUBLIC = [n for n in ag_kernels.__all__ if n != "__version__"]
DATA = {n for n in PUBLIC if not (inspect.isclass(getattr(ag_kernels, n)) or callable(getattr(ag_kernels, n)))}
SECTION = re.compile(r"^(Args|Returns|Yields|Raises|Attributes):\s*$", re.M)


def test_api_page_lists_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = re.findall(r"^::: (ag_kernels\.[\w.]+)\.(\w+)\s*$", text, re.M)
    missing = sorted(set(PUBLIC) - {name for _, name in documented})
    assert not missing, f"docs/api.md lacks a '::: ag_kernels.<module>.<name>' line for {missing}"
    assert sorted(name for _, name in documented) == sorted(PUBLIC), "docs/api.md lists a name twice or a non-public one"
    for module, name in documented:
        assert getattr(importlib.import_module(module), name) is getattr(ag_kernels, name), f"{module}.{name}"


def _sections(obj):
    return set(SECTION.findall(inspect.getdoc(obj) or ""))


def _returns_value(func):
    """Whether the function's own body returns a value (or yields)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    body = tree.body[0]
    nodes = [n for n in ast.walk(body) if not (isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not body)]
    yields = any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in nodes)
    returns = any(isinstance(n, ast.Return) and n.value is not None for n in nodes)
    return "Yields" if yields else "Returns" if returns else None


@pytest.mark.parametrize("name", PUBLIC)
def test_public_docstrings_have_sections(name):
    obj = getattr(ag_kernels, name)
    if name in DATA:
        # Data: an attribute docstring right after the assignment in the defining module.
        # (Found in whichever module of the package assigns it at top level.)
        for source in sorted((ROOT / "ag_kernels").glob("**/*.py")):
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for a, b in zip(tree.body, tree.body[1:]):
                targets = [getattr(t, "id", None) for t in getattr(a, "targets", [getattr(a, "target", None)])]
                if name in targets and isinstance(a.value, (ast.Tuple, ast.List, ast.Dict, ast.Set, ast.Call, ast.Constant)):
                    assert isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant), f"{name}: no docstring"
                    return
        raise AssertionError(f"{name}: top-level assignment not found in ag_kernels/")
    found = _sections(obj)
    assert (inspect.getdoc(obj) or "").strip(), f"{name}: no docstring"
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return  # an exception type: what raises it says when
    if inspect.isclass(obj):
        params = [p for p in inspect.signature(obj).parameters.values()]
        if params:
            need = {"Attributes"} if hasattr(obj, "__dataclass_fields__") else {"Args", "Raises"}
            assert need <= found, f"{name}: docstring lacks {sorted(need - found)}"
        return
    need = {"Raises"}
    if inspect.signature(obj).parameters:
        need.add("Args")
    kind = _returns_value(obj)
    if kind:
        need.add(kind)
    assert need <= found, f"{name}: docstring lacks {sorted(need - found)}"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://|#", target):
            assert (ROOT / target.split("#")[0]).exists(), f"README.md links to a missing {target}"


# --- the site build (CI runs it from .ci/run too) -------------------------------------------------

def _mkdocs(workdir: Path):
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(workdir / "site")],
                          cwd=workdir, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1",
                                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))


@pytest.fixture
def site_copy(tmp_path):
    """mkdocs.yml, docs/ and the package sources in a scratch folder, for builds that break them."""
    import shutil

    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('the docs extra is not installed (pip install -e ".[docs]"); .ci/run installs it')
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "ag_kernels", tmp_path / "ag_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return tmp_path


def test_site_builds_strict(site_copy):
    proc = _mkdocs(site_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("fault", ["links and pages", "api name"])
def test_site_build_fails_on_breakage(site_copy, fault):
    """A broken link, a missing anchor and a page left out of the nav, all reported by one build; an
    API name that does not resolve (mkdocstrings stops the build at once, so it gets its own)."""
    docs = site_copy / "docs"
    if fault == "api name":
        edits, expected = [("api.md", "\n::: ag_kernels.kernels.no_such_name\n")], ["no_such_name"]
    else:
        edits = [("ops.md", "\nSee [nowhere](no_such_page.md) and [the engine](engine.md#no-such-heading).\n")]
        expected = ["no_such_page.md", "no-such-heading", "orphan.md"]
        (docs / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
    for name, addition in edits:
        (docs / name).write_text((docs / name).read_text(encoding="utf-8") + addition, encoding="utf-8")
    proc = _mkdocs(site_copy)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
