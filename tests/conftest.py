import os
import sys

# The scripts live at the top level of the repo and are imported as modules by the tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
