"""Shared test settings. The tests read the benchmarks' real annotation files;
they are never committed (see datasets/README.md). Their folder is
$TCA_ANNOTATION_DIR, or else ../shared/datasets beside the checkout, or else
/work/shared/datasets (this machine's copy, for clones made elsewhere)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the project's flat modules: model, data, utils, ...

_CANDIDATES = [os.path.join(REPO, "..", "shared", "datasets"), "/work/shared/datasets"]
ANNOTATION_DIR = os.environ.get("TCA_ANNOTATION_DIR") or next(
    (d for d in _CANDIDATES if os.path.isfile(os.path.join(d, "fivr.pickle"))), _CANDIDATES[0])
if not os.path.isfile(os.path.join(ANNOTATION_DIR, "fivr.pickle")):
    raise RuntimeError(f"the real annotation files are not in {ANNOTATION_DIR}: set TCA_ANNOTATION_DIR "
                       "to the folder holding fivr.pickle, cc_web_video.pickle, evve.pickle, vcdb.pickle")
