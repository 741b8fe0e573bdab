"""The README's two commands are the ones CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_commands_match_ci():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    install = re.search(r"^INSTALL='(.*)'$", ci, re.M).group(1)
    test = re.search(r"^TEST='(.*)'$", ci, re.M).group(1)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"{install} && graphgrow demo" in readme
    assert f"{install} && {test}" in readme
