"""Where each array of the data model lives inside ``dataset.h5``.

The groups are those of the original system's HDF5 format (docs/migrating.md#hdf5-files), so its files
open unchanged. Two things differ in the files jasper writes:

- keyword ids are CSR: ``pair_data/keyword_offsets`` ``[N_p + 1]`` and ``pair_data/keyword_ids``
  (one flat dataset). The original wrote ``pair_data/keyword_ids`` as a *group* holding one small
  dataset per pair, named by the pair's row; the reader converts that to CSR.
- the splits are stored in the file (``splits/train`` ...). The original's loader read them from
  ``<split>_idx.pt`` beside the file; the reader falls back to those files when the group lacks
  a split.

This module imports nothing heavy, so it can be used to list a layout without h5py.
"""

from __future__ import annotations

from jasper.schema import CLUSTER_ARRAYS

#: File name of the HDF5 file inside a dataset directory.
FILE_NAME = "dataset.h5"

#: Version of the layout below, stored as the file attribute ``jasper_layout_version``. A reader
#: refuses files with a newer version instead of misreading them.
LAYOUT_VERSION = 1

#: File attributes identifying a file written by this package.
ATTR_FORMAT = "jasper_format"
ATTR_LAYOUT_VERSION = "jasper_layout_version"
FORMAT_NAME = "jasper-hdf5"

#: Dataset attributes: the data-model name and the logical dtype (bfloat16 is stored as its
#: uint16 bit pattern, so the stored numpy dtype alone cannot say what the array is).
ATTR_NAME = "jasper_name"
ATTR_DTYPE = "jasper_dtype"


def attr_text(value: object) -> str:
    """An attribute read back as text, fixed-length (bytes, what jasper writes) or
    variable-length (str, what files of earlier jasper-hdf5 builds hold)."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


#: Array name -> HDF5 path written by jasper (the first path read as well).
PATHS: dict[str, str] = {
    "question_embs": "embeddings/questions",
    "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords",
    "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index",
    "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance",
    "pair_keyword_offsets": "pair_data/keyword_offsets",
    "pair_keyword_ids": "pair_data/keyword_ids",
    "hard_negatives": "negatives/hardnegatives",
    "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid",
    "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual",
    "centroid_distances": "steering/distances",
    # derived steering's stored exceptions (jasper.steering)
    "steering_exception_rows": "steering/exception_rows",
    "steering_exception_values": "steering/exception_values",
    "train_idx": "splits/train",
    "val_idx": "splits/val",
    "test_idx": "splits/test",
}

# The cluster-labeled kind's arrays (records included) live in one group of their own.
PATHS.update({name: f"cluster/{name}" for name in CLUSTER_ARRAYS})

#: Further paths read when the first is absent. The original's README documented
#: ``negatives/hard`` while its converter wrote ``negatives/hardnegatives``.
FALLBACK_PATHS: dict[str, tuple[str, ...]] = {
    "hard_negatives": ("negatives/hard",),
}

#: The original system's group of per-pair keyword-id datasets (same path as jasper's CSR values).
LEGACY_KEYWORD_GROUP = "pair_data/keyword_ids"

#: Split arrays the original kept beside the file as ``<name>.pt``.
SPLIT_PT_FALLBACK: tuple[str, ...] = ("train_idx", "val_idx", "test_idx")


def candidate_paths(name: str) -> tuple[str, ...]:
    """Every HDF5 path ``name`` may be stored at, preferred first."""
    return (PATHS[name], *FALLBACK_PATHS.get(name, ()))
