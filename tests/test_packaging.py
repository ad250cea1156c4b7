"""`pip install .` into an environment that has Axolotl makes the plugin importable by name."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_pip_install_makes_the_plugin_loadable_by_axolotl(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(REPO)],
        check=True, cwd=tmp_path,
    )
    assert (target / "tms_axolotl_plugin" / "plugin.py").exists()
    code = (
        "from axolotl.integrations.base import load_plugin;"
        "p = load_plugin('tms_axolotl_plugin.TMSPlugin');"
        "import tms_axolotl_plugin;"
        "print(type(p).__name__, p.get_input_args(), tms_axolotl_plugin.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env,
                         capture_output=True, text=True).stdout
    assert "TMSPlugin tms_axolotl_plugin.config.TMSArgs" in out
    assert str(target) in out  # imported from the install, not from the checkout
