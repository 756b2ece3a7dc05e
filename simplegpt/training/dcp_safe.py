"""Reading a sharded checkpoint's dcp/ without running code from it.

torch.distributed.checkpoint reads dcp/.metadata with plain `pickle.load` and each non-tensor value
(the optimizer's hyper-parameters) with `torch.load(weights_only=False)`: a planted file would run
code on `consolidate` or on an FSDP2 resume. simplegpt hands DCP a reader whose metadata unpickler
builds DCP's own metadata classes and nothing else (`METADATA_GLOBALS`), and a planner that loads
the values with `weights_only=True`. Imported lazily: torch.distributed.checkpoint takes a while.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..errors import CheckpointError

METADATA_FILE = ".metadata"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Everything a .metadata written by DCP names: its dataclasses, torch.Size and the dtypes and
# layouts of the tensors, and the path it was saved to. Each builds data; none calls anything else.
METADATA_GLOBALS = {
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                                          "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                          "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup in torch's table of layouts by name
    *(("pathlib", name) for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _Refused(pickle.UnpicklingError):
    """A global outside METADATA_GLOBALS."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(vars(torch).get(name), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_metadata(dcp_dir: Path) -> Metadata:
    """dcp_dir/.metadata, unpickled with DCP's metadata classes only, each shard file it names a
    plain file name inside dcp_dir. Raises CheckpointError naming the file when it holds anything
    else (nothing in it is run), is damaged or cannot be read."""
    file = Path(dcp_dir) / METADATA_FILE
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{file} names {e}, which is not part of a checkpoint's metadata; unpickling it "
                              "could run code, so it was not loaded: use a checkpoint you trust") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:  # a damaged pickle raises many types
        raise CheckpointError(f"{file} is truncated or corrupted ({type(e).__name__}); use another checkpoint") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(storage, dict) or not all(
            isinstance(getattr(info, "relative_path", None), str) and Path(info.relative_path).name == info.relative_path
            and info.relative_path not in ("", ".", "..") for info in storage.values()):
        raise CheckpointError(f"{file} is not torch.distributed.checkpoint's metadata of files in {dcp_dir}; "
                              "use another checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes from read_metadata above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles the non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"the value of {read_item.dest_index.fqn!r} in a shard file of dcp/ holds objects "
                                  "other than tensors and plain values; unpickling them could run code, so it was "
                                  "not loaded: use a checkpoint you trust") from None
        # DefaultLoadPlanner puts the value in place (flattened or not) from a torch.save stream; the one it
        # gets now holds only what weights_only loading let through.
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)
