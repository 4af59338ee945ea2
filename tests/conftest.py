import os
import sys

import pytest

# The scripts live at the top level of the repo and are imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Under pytest-xdist (-n auto) the workers share the cores: one worker's torch (and the scripts it starts)
# takes its share of them rather than all, so that workers do not fight over every core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))


@pytest.fixture(scope="session", autouse=True)
def outside_the_repository(tmp_path_factory):
    """Run every test in a temporary folder: a script's default --out (runs/...) then lands there, so the
    tests never read or write the repository's own runs/, whatever a user has run before."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
