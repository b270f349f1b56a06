"""``python -m basic_plugin.lab.bench``: the same as ``basic-llava bench``."""
import sys

from basic_plugin.lab.bench import main

sys.exit(main())
