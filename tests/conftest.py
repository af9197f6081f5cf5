"""Session-wide test setup."""

import os
import tempfile


def pytest_configure(config):
    # what edgespec learns (calibrations, the machine profile, acceptance history) goes to a fresh
    # folder: tests must neither read a developer's history nor leave theirs behind. Models stay
    # where setup.sh installed them ($EDGESPEC_HOME/models).
    os.environ["EDGESPEC_STATE"] = tempfile.mkdtemp(prefix="edgespec-state-")
