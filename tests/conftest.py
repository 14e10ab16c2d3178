"""Shared test settings. The tests read the benchmarks' real annotation files;
they are never committed (see datasets/README.md). Their folder is
$TCA_ANNOTATION_DIR, or else ../shared/datasets beside the checkout."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules: model, data, utils, ...

ANNOTATION_DIR = os.environ.get("TCA_ANNOTATION_DIR") or os.path.join(REPO, "..", "shared", "datasets")
if not os.path.isfile(os.path.join(ANNOTATION_DIR, "fivr.pickle")):
    raise RuntimeError(f"the real annotation files are not in {ANNOTATION_DIR}: set TCA_ANNOTATION_DIR "
                       "to the folder holding fivr.pickle, cc_web_video.pickle, evve.pickle, vcdb.pickle")
