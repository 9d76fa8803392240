"""One import name: Frugal installs as ``frugal.*`` only, so a user's own ``train.py``, ``rewards.py`` or
Hydra ``conf/`` in the working directory shadows nothing (and Frugal shadows none of theirs)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SUBPACKAGES = ("train", "inference", "runtime", "rewards", "tasks", "evaluator", "recipes", "conf")


def _user_project(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text("WHO = 'the user'\n")
    (tmp_path / "rewards.py").write_text("WHO = 'the user'\n")
    (tmp_path / "conf").mkdir()
    # A Hydra primary config of the user's own, under the name Frugal's recipe uses.
    (tmp_path / "conf" / "train.yaml").write_text("user_key: 1\n")
    return tmp_path


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


def test_user_modules_and_frugal_coexist_in_one_working_directory(tmp_path):
    cwd = _user_project(tmp_path)
    code = (
        "import train, rewards\n"
        "assert train.WHO == 'the user' and rewards.WHO == 'the user', (train.__file__, rewards.__file__)\n"
        "import frugal.train.prm, frugal.evaluator, frugal.evaluator.strategies as s\n"
        "assert frugal.train.prm.load_prm and 'particle_filter' in s.RUNNERS\n"
        "import frugal.conf, os\n"
        "assert os.path.isfile(os.path.join(frugal.conf.CONF_DIR, 'train.yaml'))\n"
        "assert os.path.realpath(frugal.conf.CONF_DIR) != os.path.realpath('conf'), 'the user conf/ was picked'\n"
        "print('OK', train.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK ") and str(cwd) in out.stdout


def test_frugal_train_cfg_job_ignores_the_users_conf_folder(tmp_path):
    cwd = _user_project(tmp_path)
    console = Path(sys.executable).parent / "frugal"
    for cmd in ([str(console), "train", "--cfg", "job", "algo=grpo"],
                [sys.executable, "-m", "frugal.recipes.train", "--cfg", "job", "algo=grpo"]):
        out = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (cmd, out.stderr[-3000:])
        assert "user_key" not in out.stdout
        assert "name: grpo" in out.stdout and "group_size:" in out.stdout, out.stdout[:2000]


IMPORT_IN_TEXT = re.compile(r"(?:^|\n|\")\s*(?:from|import) ([A-Za-z_][\w.]*)")


def _imports(path: Path):
    """Modules imported by ``path``: its import statements, and import lines inside its string literals
    (code it writes for users: model cards, subprocess snippets)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield from IMPORT_IN_TEXT.findall(node.value)


def test_no_module_imports_a_bare_top_level_subpackage_name():
    """``from train.prm import …`` would import a user's ``train.py`` (or fail) once installed."""
    offenders = []
    for folder in (*SUBPACKAGES, "scripts", "tests", "frugal"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == Path(__file__).resolve():  # imports the user's own train.py on purpose
                continue
            for name in _imports(path):
                if name.split(".")[0] in SUBPACKAGES:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, "import through frugal.*:\n" + "\n".join(offenders)


def test_the_distribution_exposes_exactly_one_import_name():
    """The installed package list is ``frugal`` and its subpackages: nothing generic at the top level."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.split(".")[0] for p in setup["packages"]} == {"frugal"}
    mapped = setup["package-dir"]
    for sub in SUBPACKAGES:
        assert mapped[f"frugal.{sub}"] == sub
        assert (ROOT / sub / "__init__.py").is_file(), f"{sub}/ must be a regular package"
    # and every folder with Python modules under a mapped folder is itself listed (else a wheel would drop it)
    for sub in SUBPACKAGES:
        for init in (ROOT / sub).rglob("__init__.py"):
            name = "frugal." + ".".join(init.parent.relative_to(ROOT).parts)
            assert name in setup["packages"], f"{name} is not in [tool.setuptools] packages"


def test_accelerate_launch_runs_the_recipe_as_a_module(tmp_path):
    """``accelerate launch -m frugal.recipes.train …`` (what the scaling docs show) finds the recipe, from a
    working directory that has a ``train.py`` of its own."""
    cwd = _user_project(tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           "-m", "frugal.recipes.train", "--cfg", "job", "algo=tspmo"]
    out = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "name: tspmo" in out.stdout and "user_key" not in out.stdout
