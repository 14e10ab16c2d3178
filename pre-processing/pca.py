"""Learn or apply the PCA-whitening of frame features (whitening.py): learn it
from a few random frames of every video (upstream: 10 per video of VCDB),
apply it to every frame (3840-d iMAC -> 1024-d, L2-normalised).

    python pre-processing/pca.py --learn vcdb_imac.h5 --params pca.npz
    python pre-processing/pca.py --apply fivr_imac.h5 --params pca.npz --output fivr_imac_pca1024.h5 --components 1024

--apply is resumable like extract_features.py (writer.py): a re-run skips
the videos already done.
"""
import argparse
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import UserError, check_outputs_apart, check_writable, open_features, read_features, run_main  # noqa: E402
from whitening import apply_pca, learn_pca, load_params, sample_frames, save_params  # noqa: E402
from writer import ResumableH5Writer, dataset_names, file_digest, read_settings  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--learn", metavar="IN.h5", help="learn the whitening from the features of this HDF5 file")
    mode.add_argument("--apply", metavar="IN.h5", help="whiten the features of this HDF5 file")
    parser.add_argument("--params", required=True, help=".npz parameters file: written by --learn, read by --apply")
    parser.add_argument("--frames_per_video", type=int, default=10,
                        help="--learn: random frames sampled per video (all frames of shorter videos)")
    parser.add_argument("--seed", type=int, default=0, help="--learn: seed of the frame sampling")
    parser.add_argument("--output", help="--apply: HDF5 file to write, one (T, components) dataset per video id")
    parser.add_argument("--components", type=int, default=1024, help="--apply: output dimensions (--learn reports the share of variance they keep)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="--apply: stored precision; float16 halves the file (every reader computes in float32)")
    parser.add_argument("--checkpoint_every", type=float, default=60.0,
                        help="--apply: seconds between saves of finished videos; a killed run loses at most this")
    return parser


def learn(args):
    if args.frames_per_video <= 0:
        raise UserError("--frames_per_video must be positive")
    check_outputs_apart({"--params": args.params}, {"--learn": args.learn})
    check_writable(args.params)  # before the learning, not after it
    with open_features(args.learn) as f:
        names = dataset_names(f)
        if not names:
            raise UserError(f"{args.learn}: no features")
        if f[names[0]].ndim != 2:
            raise UserError(f"{args.learn}: {names[0]} has shape {f[names[0]].shape}, expected (T, D)")
        num_dims = f[names[0]].shape[1]
        params = learn_pca(sample_frames(f, names, args.learn, args.frames_per_video, num_dims, args.seed), num_dims)
    if params["num_samples"] <= num_dims:
        print(f"WARNING: only {params['num_samples']} frames for {num_dims} dimensions: the components beyond "
              f"the {params['num_samples'] - 1}th are noise", file=sys.stderr)
    save_params(args.params, params)
    components = min(args.components, num_dims)
    kept = params["lams"][:components].sum() / params["lams"].sum()
    print(f"learned PCA of {num_dims}-d features from {params['num_samples']} frames of {len(names)} videos "
          f"into {args.params}; the top {components} components hold {100 * kept:.1f}% of the variance")


def apply(args):
    if args.output is None:
        raise UserError("--apply needs --output")
    check_outputs_apart({"--output": args.output}, {"--apply": args.apply, "--params": args.params})
    params = load_params(args.params, args.components)
    start, num_frames = time.time(), 0
    with open_features(args.apply) as f:
        names = dataset_names(f)
        # the input's settings (fps, weights, ...: extract_features.py's) and the whitening's
        settings = dict(read_settings(f), pca_params=file_digest(args.params), components=params["U"].shape[1],
                        dtype=args.dtype)
        with ResumableH5Writer(args.output, args.checkpoint_every, settings) as writer:
            todo = [name for name in names if name not in writer]
            print(f"{len(names)} videos, {len(names) - len(todo)} already done, {len(todo)} to whiten")
            for name in tqdm(todo, unit="video"):
                features = f[name]
                if features.ndim != 2 or features.shape[1] != len(params["mu"]):
                    raise UserError(f"{args.apply}: {name} has shape {features.shape}, "
                                    f"the PCA expects (T, {len(params['mu'])})")
                writer.add(name, apply_pca(read_features(f, name, args.apply), params).astype(args.dtype, copy=False))
                num_frames += len(features)
    print(f"whitened {len(todo)} videos ({num_frames} frames, {time.time() - start:.1f} s) "
          f"to {params['U'].shape[1]} dimensions into {args.output}")


def main():
    args = get_args_parser().parse_args()
    learn(args) if args.learn else apply(args)


if __name__ == "__main__":
    run_main(main)
