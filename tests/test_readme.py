"""The README and docs/: the configuration reference is generated from the config classes and must not drift;
every file the code cites exists; the tools run as commands."""

import os
import re
import subprocess
import sys

from megatron_apex.config import reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_config_reference_matches_config_classes():
    doc = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", doc, re.S)
    assert m, "docs/configuration.md lacks the configuration reference markers"
    assert m.group(1) == reference_markdown(), "docs/configuration.md drifted: run tools/sync_docs.py"


def test_readme_opens_with_the_two_commands():
    head = _readme().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_readme_tools_exist():
    for tool in re.findall(r"`(tools/[a-z_]+\.py)", _readme()):
        assert os.path.exists(os.path.join(ROOT, tool)), f"README mentions {tool}, which does not exist"


def test_sync_tool_check_mode_agrees():
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sync_docs.py"), "--check"]).returncode
    assert rc == 0


def test_every_tool_runs_as_a_command():
    """tools/*.py start with '#!/usr/bin/env python3' and have their run bit, so ./tools/X.py --help works
    in the activated virtual environment."""
    import glob
    import os
    import stat

    tools = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "*.py")))
    assert tools
    for path in tools:
        with open(path, encoding="utf-8") as f:
            assert f.readline().rstrip("\n") == "#!/usr/bin/env python3", path
        assert os.stat(path).st_mode & stat.S_IXUSR, f"{path} has no run bit"


def test_every_document_the_code_cites_exists():
    """References to docs/*.md in the code, the README and docs/ itself name files that exist."""
    import glob

    sources = [p for pattern in ("megatron_apex/**/*.py", "tools/*.py", "benchmarks/*.py", "examples/**/*.md",
                                 "docs/*.md", "README.md") for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    cited = set()
    for path in sources:
        text = open(path, encoding="utf-8").read()
        cited |= {m for m in re.findall(r"docs/([a-z_]+\.md)", text)}
        if path.startswith(os.path.join(ROOT, "docs")):  # relative links between docs
            cited |= set(re.findall(r"\]\(([a-z_]+\.md)\)", text))
    assert cited
    missing = sorted(name for name in cited if not os.path.isfile(os.path.join(ROOT, "docs", name)))
    assert not missing, f"cited but missing in docs/: {missing}"
    for path in sources:
        assert "apex-method.md" not in open(path, encoding="utf-8").read(), f"{path} cites a file outside the repository"


def _readme_commands() -> list:
    blocks = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    lines = [ln.strip() for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_readme_commands_work_as_written(capsys):
    """Every command the README shows: `megatron-apex train` lines plan successfully (as --dry-run, the
    planning of the very command), the module torchrun starts exists, launch scripts exist, and the make
    targets are the Makefile's."""
    import importlib.util
    import shlex

    from megatron_apex.cli import main

    commands = _readme_commands()
    assert any(c.startswith("megatron-apex train") for c in commands)
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    for command in commands:
        words = shlex.split(command.split("#")[0])
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.M), command
        elif words[0] == "source":
            assert words[1] == ".venv/bin/activate" and "VENV ?= .venv" in makefile, command
        elif words[0] == "megatron-apex":
            args = words[1:] + ([] if "--dry-run" in words else ["--dry-run"])
            if "--world-size" not in args:
                args += ["--world-size", "1"]
            assert main(args) == 0, (command, capsys.readouterr())
        elif words[0] == "torchrun":
            module = words[words.index("-m") + 1]
            assert importlib.util.find_spec(module), command
        else:
            script = next(w for w in words if w.startswith("launch_scripts/"))
            assert os.path.isfile(os.path.join(ROOT, script)), command
