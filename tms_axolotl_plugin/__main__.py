import sys

from tms_axolotl_plugin.cli import main

sys.exit(main())
