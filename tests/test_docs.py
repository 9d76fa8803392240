"""The documentation stays honest: every command it shows composes and validates.

Every ``frugal <recipe> …`` command in a fenced code block (```` ```bash ````, ```` ```sh ````,
```` ```console ````, ```` ```shell ```` or unlabelled) of README.md and docs/*.md is one test case, named by
its file, line and text. Lines are joined at ``\\`` continuations; ``# comments``, a leading ``$ `` and
``NAME=value`` environment prefixes are dropped; ``make …`` lines are skipped. The module forms
``python -m frugal.recipes.<module> …`` and ``accelerate launch … -m frugal.recipes.<module> …`` are
checked the same way (the overrides after the module).

For each command the overrides are split with :func:`shlex.split` (as a shell would), Hydra flags
(``--cfg job``, ``--help``) are dropped, the recipe's primary config is composed with Hydra's compose API
after importing its recipe module (which registers the structured schema), and the composed config goes
through the validation the recipe's ``run`` starts with: ``to_config(cfg, <the recipe's typed config>)``,
which runs every ``__post_init__``. No model is loaded and nothing is run.

A command whose comment starts with ``# refused`` documents a config that must be refused: composing or
validating it has to raise.

What the test does not check, and why:

* Files the commands read (an adapter folder, a PRM folder, ``labels.jsonl``) do not exist at test time.
  Today no recipe's validation checks an input path (``frugal export`` resolves ``source`` and
  ``frugal eval`` reads the PRM folder's separator only after validation), so composition and schema
  validation are checked as usual; in case a validation comes to check existence, every relative input
  path a command names (``prm_path``, ``model.adapter``, ``source``, ``data.paths``, …) is created as an
  empty placeholder under a temporary working directory that the case runs in.
* ``generation.backend=vllm`` (colocate) validates that vLLM is installed (``make test-vllm`` has it; the suite does not). For commands that select it,
  that one check is made to find vLLM; the rest of the config is validated normally.
* ``python scripts/…`` lines are not run (benchmarks take minutes to hours); the script must exist.

Also checked: README.md is at most 15,000 characters and keeps ``make demo`` / ``make test``, it links to
every docs/*.md page, and every relative link in README.md and docs/*.md points to a file that exists (and
to a heading of it, for a ``page.md#anchor`` link).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from frugal.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "console", "shell"}
README_LIMIT = 15_000

# recipe -> (module, primary config, name of its typed config in that module); cf. recipes/cli.py RECIPES
RECIPES = {
    "train": ("frugal.recipes.train", "train", "TrainConfig"),
    "eval": ("frugal.recipes.eval", "eval", "EvalConfig"),
    "train-prm": ("frugal.recipes.train_prm", "train_prm", "TrainPRMConfig"),
    "label-prm": ("frugal.recipes.label_prm", "label_prm", "LabelPRMConfig"),
    "plan": ("frugal.recipes.plan", "plan", "PlanConfig"),
    "export": ("frugal.recipes.export", "export", "ExportConfig"),
}
MODULE_TO_RECIPE = {module: name for name, (module, _, _) in RECIPES.items()}
# Overrides whose values name inputs that must exist when the command really runs.
INPUT_PATH_KEYS = {"prm_path", "model.adapter", "source", "data.paths", "data.eval_paths", "eval_summary",
                   "task.path", "task.test_path", "search.ssr.draft_adapter"}
ENV_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    file: str
    line: int
    text: str  # the command as written (continuations joined, comment and prompt dropped)
    words: list[str]  # shlex words from the program name on
    comment: str

    @property
    def id(self) -> str:
        text = self.text if len(self.text) <= 110 else self.text[:107] + "..."
        return f"{self.file}:{self.line}: {text}"


def shell_lines(path: Path):
    """(line number, logical line) of every fenced shell / unlabelled block, ``\\`` continuations joined."""
    fence, pending, start = None, "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if fence is None:
            m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence = (m.group(1), m.group(2).lower())
            continue
        if stripped.startswith(fence[0]) and stripped.strip("`~") == "":
            fence, pending = None, ""
            continue
        if fence[1] not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        code = _strip_comment(raw).rstrip()
        if code.endswith("\\"):  # a backslash in a comment continues nothing
            pending += code[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""


def parse(path: Path, number: int, line: str) -> Command | None:
    text = line.strip()
    if text.startswith("$ "):
        text = text[2:].strip()
    code = _strip_comment(text).strip()
    if not code:
        return None
    words = shlex.split(ANSI_C.sub(lambda m: shlex.quote(_ansi_c(m.group(1))), code))
    while words and ENV_PREFIX.match(words[0]):
        words = words[1:]
    if not words:
        return None
    comment = _strip_comment(text)
    comment = text[len(comment):].lstrip("#").strip()
    return Command(path.relative_to(ROOT).as_posix(), number, " ".join(code.split()), words, comment)


ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'")  # bash's $'...' quoting, e.g. $'engine.step_delimiter="\n"'


def _ansi_c(body: str) -> str:
    """The string bash makes of ``$'body'`` (backslash escapes such as ``\\n``, ``\\t``, ``\\'``)."""
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _strip_comment(text: str) -> str:
    """``text`` up to its first ``#`` that starts a shell comment (outside quotes, after whitespace)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


def recipe_and_overrides(words: list[str]) -> tuple[str, list[str]] | None:
    """The recipe and its Hydra overrides, or None if the words are not a recipe command."""
    if words[0] == "frugal":
        return (words[1] if len(words) > 1 else "--help"), words[2:]
    if "-m" in words and words[0] in ("python", "python3", "accelerate"):
        i = words.index("-m")
        module = words[i + 1] if i + 1 < len(words) else ""
        if module in MODULE_TO_RECIPE:
            return MODULE_TO_RECIPE[module], words[i + 2:]
    return None


def collect():
    commands, scripts = [], []
    for path in DOCS:
        for number, line in shell_lines(path):
            cmd = parse(path, number, line)
            if cmd is None or cmd.words[0] == "make":
                continue
            if cmd.words[0] in ("python", "python3") and len(cmd.words) > 1 and cmd.words[1].startswith("scripts/"):
                scripts.append(cmd)
            elif recipe_and_overrides(cmd.words) is not None:
                commands.append(cmd)
    return commands, scripts


COMMANDS, SCRIPTS = collect()


def hydra_overrides(recipe: str, args: list[str]) -> list[str]:
    """Drop Hydra's own flags (``--cfg job``, ``--help``); anything else that is not an override fails."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c"):
            skip = True
        elif arg in ("--help", "-h", "--hydra-help", "--info", "--resolve"):
            continue
        elif arg.startswith("-"):
            raise AssertionError(f"frugal {recipe}: {arg!r} is not a Hydra override or a flag this test knows")
        else:
            out.append(arg)
    return out


def make_placeholders(overrides: list[str], where: Path) -> None:
    """Empty files / folders for the relative input paths a command names (see the module docstring)."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.lstrip("+~") not in INPUT_PATH_KEYS:
            continue
        values = [v.strip().strip("'\"") for v in value.strip("[]").split(",")] if value.startswith("[") else [value]
        for v in values:
            if not v or v.startswith("/") or "<" in v or v in ("null", "true", "false"):
                continue
            target = where / v
            if target.suffix in (".jsonl", ".json"):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)


def compose_and_validate(recipe: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    assert recipe in RECIPES, f"unknown recipe {recipe!r} (recipes: {', '.join(RECIPES)})"
    module_name, config_name, schema_name = RECIPES[recipe]
    module = importlib.import_module(module_name)  # registers the recipe's structured schema
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    return module.to_config(cfg, getattr(module, schema_name))


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_composes_and_validates(cmd: Command, tmp_path, monkeypatch):
    recipe, args = recipe_and_overrides(cmd.words)
    overrides = hydra_overrides(recipe, args)
    monkeypatch.chdir(tmp_path)
    make_placeholders(overrides, tmp_path)
    if "generation.backend=vllm" in overrides:  # vLLM may not be installed here: pretend it is
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: (
            importlib.machinery.ModuleSpec(name, None) if name == "vllm" else find_spec(name, *a, **k)))
    if cmd.comment.lower().startswith("refused"):
        with pytest.raises(Exception) as refused:
            compose_and_validate(recipe, overrides)
        # refused for the documented reason: the error names one of the keys the command sets
        keys = [o.partition("=")[0].lstrip("+~").rsplit(".", 1)[-1] for o in overrides if "." in o.partition("=")[0]]
        assert any(key in str(refused.value) for key in keys), f"refused, but not naming any of {keys}: {refused.value}"
        return
    compose_and_validate(recipe, overrides)


@pytest.mark.parametrize("cmd", SCRIPTS, ids=[c.id for c in SCRIPTS])
def test_documented_script_exists(cmd: Command):
    assert (ROOT / cmd.words[1]).is_file(), f"{cmd.file}:{cmd.line}: no such script {cmd.words[1]}"


def test_docs_show_commands_of_every_recipe():
    shown = {recipe_and_overrides(c.words)[0] for c in COMMANDS}
    assert shown >= set(RECIPES), f"no documented command for {sorted(set(RECIPES) - shown)}"


def test_readme_is_short_and_keeps_the_quickstart():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters (at most {README_LIMIT})"
    lines = [line.split("#")[0].strip() for _, line in shell_lines(ROOT / "README.md")]
    assert "make demo" in lines and "make test" in lines


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    out = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_relative_links_exist(doc: Path):
    text = (doc).read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path, _, anchor = target.partition("#")
        if not (doc.parent / path).exists():
            missing.append(target)
        elif anchor and path.endswith(".md") and anchor not in anchors(doc.parent / path):
            missing.append(target)
    assert not missing, f"{doc.name}: links to missing files or headings {missing}"


def test_readme_links_to_every_doc_and_they_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {t.split("#")[0] for t in LINK.findall(text) if t.startswith("docs/")}
    assert linked, "README.md links to no docs/ page"
    for target in sorted(linked):
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs/ pages the README does not link: {sorted(pages - linked)}"


# ---------------------------------------------------------------------- defaults stated in the docs

# The dataclasses are where a default is written; a docs table that states one must agree with them.
# Which composed config each `| key | default | meaning |` table describes, by the heading above it.
DEFAULT_TABLES = {
    ("algorithms.md", "## RL fine-tuning"): ("train", [], "algo."),
    ("algorithms.md", "### S-GRPO (`algo=sgrpo`, the default)"): ("train", [], "algo."),
    ("algorithms.md", "### T-SPMO (`algo=tspmo`)"): ("train", ["algo=tspmo"], "algo."),
    ("evaluator.md", "## Other `frugal eval` keys"): ("eval", ["search=majority"], ""),
    ("evaluator.md", "## The engine"): ("eval", ["search=majority"], "engine."),
    ("evaluator.md", "### Engine backends: `engine.backend=hf|vllm|openai`"): ("eval", ["search=majority"], ""),
    ("evaluator.md", "#### `engine.backend=openai` keys"): (
        "eval", ["search=majority", "engine.backend=openai", "engine.base_url=http://127.0.0.1:1/v1"], "engine."),
    ("evaluator.md", "## Budget planning: `frugal plan`"): ("plan", [], ""),
    ("export.md", "## Keys"): ("export", ["source=runs/demo"], ""),
    ("training.md", "## `frugal train`"): ("train", [], ""),
    ("training.md", "### `frugal train-prm`"): ("train-prm", [], ""),
}
KEY_NAME = re.compile(r"`([A-Za-z_][\w.]*)`")


def default_tables():
    """(doc, heading, [(line number, keys, stated default)]) for each table with a default column."""
    for (name, heading), context in DEFAULT_TABLES.items():
        lines = (ROOT / "docs" / name).read_text().splitlines()
        start = lines.index(heading)
        header = next(i for i in range(start, len(lines)) if re.match(r"\| .*key.* \| default \|", lines[i]))
        rows = []
        for i in range(header + 2, len(lines)):
            if not lines[i].startswith("|"):
                break
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))]
            rows.append((i + 1, KEY_NAME.findall(cells[0]), cells[1]))
        yield name, heading, context, rows


def _stated(text: str):
    """A stated default as a value, or None when it is prose ("required", "`<run>/export`")."""
    import yaml

    text = text.strip()
    quoted = text.startswith("`")
    text = text.strip("`")
    if not text or "<" in text or " " in text.replace(", ", ","):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        except ValueError:
            return value if quoted else None  # a bare word is prose ("required"); a value is `quoted`
    return value


def test_every_default_table_is_checked():
    """Each docs table with a default column is named in DEFAULT_TABLES (so none escapes the check)."""
    found = set()
    for doc in sorted((ROOT / "docs").glob("*.md")):
        heading = None
        for line in doc.read_text().splitlines():
            if line.startswith("#"):
                heading = line
            elif re.match(r"\| .*key.* \| default \|", line):
                found.add((doc.name, heading))
    assert found == set(DEFAULT_TABLES)


@pytest.mark.parametrize("name,heading,context,rows", list(default_tables()),
                         ids=[f"{n}:{h.lstrip('# ')}" for n, h, _, _ in default_tables()])
def test_defaults_in_the_docs_are_the_dataclasses(name, heading, context, rows):
    from omegaconf import OmegaConf

    recipe, overrides, prefix = context
    cfg = OmegaConf.structured(compose_and_validate(recipe, overrides))
    checked, wrong = 0, []
    for number, keys, stated in rows:
        values = [_stated(v) for v in stated.split(", ")] if ", " in stated else [_stated(stated)]
        if len(values) == 1:
            values = values * len(keys)
        if len(values) != len(keys):
            continue  # prose in the default column
        group = ""
        for key, value in zip(keys, values):
            group = key.rpartition(".")[0] + "." if "." in key else group  # `generation.a`, `b` -> generation.b
            full = prefix + (key if "." in key else group + key)
            actual = OmegaConf.select(cfg, full, default="<absent>")
            if value is None and stated.strip() != "null":
                continue
            if OmegaConf.is_config(actual) and isinstance(value, str):
                continue  # a config group's choice (`logger` | `none`)
            if isinstance(actual, (int, float)) and not isinstance(actual, bool) and isinstance(value, (int, float)):
                ok = float(actual) == float(value)
            else:
                ok = OmegaConf.to_container(actual) == value if OmegaConf.is_config(actual) else actual == value
            checked += 1
            if not ok:
                wrong.append(f"docs/{name}:{number}: {full} is {actual!r} in the config, the docs say {value!r}")
    assert checked, f"no default checked in docs/{name} {heading}"
    assert not wrong, "\n".join(wrong)
