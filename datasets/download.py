"""Download the benchmarks' annotation files into datasets/ and check them
against their known SHA-256. Usage: python datasets/download.py [name ...]
(names: fivr fivr_easy_duplicates cc_web_video cc_web_video_tca evve vcdb;
default: all)."""
import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
GITHUB = "https://raw.githubusercontent.com"
FILES = {
    # name: (url, sha256); saved as <name>.pickle, or under the url's file name when it is not a pickle
    "fivr": (f"{GITHUB}/mever-team/distill-and-select/main/datasets/fivr.pickle",
             "dce327ab664dfaade878a3fb474f7a598141a513c484572f95629dcbf1c020f3"),
    # S2VS's easy duplicates (MIT), for FIVR "hard"
    "fivr_easy_duplicates": (f"{GITHUB}/gkordo/s2vs/main/data/fivr_easy_duplicates.txt",
                             "b50b7135d68d686c9a09f16196e134cab36d16007377c53f54c49ba83bc7efdb"),
    "cc_web_video": (f"{GITHUB}/MKLab-ITI/visil/master/datasets/cc_web_video.pickle",
                     "6c33932cfa6ed08eb02fb47189b38bcef124c07794e99adf5c04163dcf4c52fe"),
    "cc_web_video_tca": (f"{GITHUB}/xwen99/temporal_context_aggregation/master/datasets/cc_web_video.pickle",
                         "6166e6d9090f93a10dc4af5827a864e65ee77f8a0992576ab1a0849af47fe20b"),
    "evve": (f"{GITHUB}/MKLab-ITI/visil/master/datasets/evve.pickle",
             "0898fafc817b9457be25cafeefa996d78d1021fb4816a9e3c1a14b7493023410"),
    "vcdb": (f"{GITHUB}/xwen99/temporal_context_aggregation/master/datasets/vcdb.pickle",
             "6cec73506f401c4dc6d0af2757b2927307cff1dcb6f1c5d9d6775e358fefe4bf"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*",
                        help="which files to fetch (default: all)")
    parser.add_argument("--out_dir", default=HERE, help="where to save them (default: datasets/)")
    args = parser.parse_args()
    names = args.names or sorted(FILES)
    os.makedirs(args.out_dir, exist_ok=True)
    unknown = [n for n in names if n not in FILES]
    if unknown:
        sys.exit(f"error: unknown annotation file(s) {unknown}; choose from {sorted(FILES)}")
    failed = []
    for name in names:
        url, sha256 = FILES[name]
        target = os.path.join(args.out_dir, f"{name}.pickle" if url.endswith(".pickle") else os.path.basename(url))
        if os.path.exists(target) and hashlib.sha256(open(target, "rb").read()).hexdigest() == sha256:
            print(f"{target}: already present")
            continue
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:
            print(f"error: cannot download {url} ({e}); without internet, copy {os.path.basename(target)} into "
                  f"{args.out_dir} from a machine that has it (see datasets/README.md)", file=sys.stderr)
            failed.append(name)
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            print(f"error: {url}: SHA-256 differs from the expected {sha256}; not saved", file=sys.stderr)
            failed.append(name)
            continue
        tmp = target + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        print(f"{target}: downloaded")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
