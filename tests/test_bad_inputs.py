"""The bad-input contract in one place: every input that can be checked is checked before the long work, and
a bad one gives one line "error: ..." that names the option or file, never a traceback; a failed write leaves
no partial file. (Older checks of the same kind stay beside the tests of each script.)"""
import os

import toy_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_never_touch_the_repositorys_runs_folder():
    """conftest runs every test in a temporary folder: a default --out such as toy_2d's runs/toy_2d, which
    the README's first command fills, lies outside the repository."""
    out = os.path.abspath(toy_2d.parse_args([]).out)
    assert not out.startswith(ROOT + os.sep), out
