"""Trajectory-Mixed Supervision (TMS) for Axolotl.

Enable with `plugins: [tms_axolotl_plugin.TMSPlugin]` and a `tms:` block in an Axolotl config.
The plugin class is imported lazily so the plain modules (draws, label store, fingerprints,
offline assets) stay importable without loading Axolotl.
"""

__version__ = "0.1.0"
__all__ = ["TMSPlugin", "__version__"]


def __getattr__(name: str):
    if name == "TMSPlugin":
        from tms_axolotl_plugin.plugin import TMSPlugin

        return TMSPlugin
    raise AttributeError(f"module 'tms_axolotl_plugin' has no attribute {name!r}")
