"""Loggers for the plugin.

Axolotl's logging config only lets INFO through for loggers under `axolotl`, so the plugin
logs under `axolotl.integrations.tms.*`: its messages then appear in the console and in
`output_dir/debug.log` with Axolotl's own formatting.
"""

import logging


def get_logger(module_name: str) -> logging.Logger:
    short = module_name.rsplit(".", 1)[-1]
    return logging.getLogger(f"axolotl.integrations.tms.{short}")
