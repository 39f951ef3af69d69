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
