"""What the lab's commands do with their arguments before parsing them."""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence


def strip_separator(argv: Optional[Sequence[str]]) -> List[str]:
    """``argv`` (None: the process's) without a leading ``--`` (``basic-llava JOB -- --flag ...`` hands it through)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[1:] if argv[:1] == ["--"] else argv
