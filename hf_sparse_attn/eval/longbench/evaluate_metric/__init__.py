"""Path of the local ``evaluate`` metric script: ``evaluate.load(METRIC_PATH, "<task>")``."""

import os

METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "longbench.py")
