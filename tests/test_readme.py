"""The README's configuration reference is generated from the config classes and must not drift."""

import os
import re
import subprocess
import sys

from megatron_apex.config import reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_config_reference_matches_config_classes():
    m = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", _readme(), re.S)
    assert m, "README lacks the configuration reference markers"
    assert m.group(1) == reference_markdown(), "README configuration reference drifted: run tools/sync_readme.py"


def test_readme_opens_with_the_two_commands():
    head = _readme().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_readme_tools_exist():
    for tool in re.findall(r"`(tools/[a-z_]+\.py)", _readme()):
        assert os.path.exists(os.path.join(ROOT, tool)), f"README mentions {tool}, which does not exist"


def test_sync_tool_check_mode_agrees():
    rc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sync_readme.py"), "--check"]).returncode
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
