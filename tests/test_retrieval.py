"""retrieval.py: features -> embeddings -> similarities, shared by evaluation,
training's validation, index and search (evaluation.py's model-mode tests
exercise it end to end through the command line)."""
import numpy as np

import retrieval


def test_encode_videos_batches_videos_of_similar_length():
    """A batch never pads its shortest chunk beyond the length spread (attention
    runs on the padded batch), and every video comes out once."""
    lengths = np.random.default_rng(0).integers(1, 300, 100)
    features = {str(i): np.ones((t, 4), np.float32) for i, t in enumerate(lengths)}
    seen = []
    for batch in retrieval.encode_videos(None, features, list(features), lengths, video_level=False,
                                         frame_level=True, padding_size=0):
        assert batch.embeddings is None
        assert batch.num_frames.tolist() == lengths[batch.indices].tolist()
        longest, shortest = lengths[batch.indices].max(), lengths[batch.indices].min()
        assert longest <= retrieval.BATCH_LENGTH_SPREAD * shortest + retrieval.BATCH_LENGTH_SLACK
        seen.extend(batch.indices.tolist())
    assert sorted(seen) == list(range(len(lengths)))


def test_chunk_bounds_split_as_array_split():
    for num_frames, padding_size in ((23, 10), (31, 10), (9, 10), (300, 300), (301, 300), (7, 0)):
        pieces = -(-num_frames // padding_size) if padding_size and num_frames > padding_size else 1
        expected = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(num_frames), pieces)]
        assert retrieval._chunk_bounds(num_frames, padding_size) == expected
