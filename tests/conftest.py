import os
import sys

import pytest

# The scripts live at the top level of the repo and are imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def outside_the_repository(tmp_path_factory):
    """Run every test in a temporary folder: a script's default --out (runs/...) then lands there, so the
    tests never read or write the repository's own runs/, whatever a user has run before."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(cwd)
