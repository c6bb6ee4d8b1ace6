"""``python -m reinforcepp.compare SPEC``: the child process of one compare run (see :func:`.runner.child_main`).

:func:`.runner.run_compare` starts it once per (estimator, seed); the command ``reinforcepp compare`` is
:func:`.cli.main`, not this.
"""

import sys

from .runner import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
