"""The flows and their command lines."""

from pathlib import Path

#: ``python flows/train_flow.py --help``, rendered from the options and the jobs' defaults by
#: ``python flows/options.py``: printing it needs no torch (the jobs' defaults live in modules
#: that define torch models). tests/test_project.py keeps it current.
HELP_FILE = Path(__file__).with_name("train_help.txt")
