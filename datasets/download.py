"""Re-fetch the benchmarks' annotation files into datasets/ (the repository
ships them) and check them against the SHA-256 in datasets/SHA256SUMS. Usage: python datasets/download.py [name ...]
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
# name: url; saved as <name>.pickle, or under the url's file name when it is not a pickle. Their SHA-256
# are those of the files this repository ships, listed once in SHA256SUMS.
URLS = {
    "fivr": f"{GITHUB}/mever-team/distill-and-select/main/datasets/fivr.pickle",
    "fivr_easy_duplicates": f"{GITHUB}/gkordo/s2vs/main/data/fivr_easy_duplicates.txt",  # MIT, for FIVR "hard"
    "cc_web_video": f"{GITHUB}/MKLab-ITI/visil/master/datasets/cc_web_video.pickle",
    "cc_web_video_tca": f"{GITHUB}/xwen99/temporal_context_aggregation/master/datasets/cc_web_video.pickle",
    "evve": f"{GITHUB}/MKLab-ITI/visil/master/datasets/evve.pickle",
    "vcdb": f"{GITHUB}/xwen99/temporal_context_aggregation/master/datasets/vcdb.pickle",
}


def file_name(name):
    url = URLS[name]
    return f"{name}.pickle" if url.endswith(".pickle") else os.path.basename(url)


def expected_sha256():
    """{file name: SHA-256} from SHA256SUMS (sha256sum's format)."""
    with open(os.path.join(HERE, "SHA256SUMS")) as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


FILES = {name: (URLS[name], expected_sha256()[file_name(name)]) for name in URLS}


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
        target = os.path.join(args.out_dir, file_name(name))
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
