"""Shared test fixtures.

The benchmark tests read the real annotation files, which are never committed
(datasets/README.md): the `annotation_dir` fixture is $TCA_ANNOTATION_DIR, or
else ../shared/datasets beside the checkout. A test that needs them and does
not find them fails with a line naming TCA_ANNOTATION_DIR; the other tests
run without them. pytest.ini puts the project's flat modules on sys.path.
"""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATION_DIR = os.environ.get("TCA_ANNOTATION_DIR") or os.path.join(REPO, "..", "shared", "datasets")


@pytest.fixture(scope="session")
def annotation_dir():
    """The folder of the real annotation files (fivr.pickle, ...)."""
    if not os.path.isfile(os.path.join(ANNOTATION_DIR, "fivr.pickle")):
        pytest.fail(f"the real annotation files are not in {ANNOTATION_DIR}: set TCA_ANNOTATION_DIR to the "
                    "folder holding fivr.pickle, cc_web_video.pickle, evve.pickle, vcdb.pickle", pytrace=False)
    return ANNOTATION_DIR
