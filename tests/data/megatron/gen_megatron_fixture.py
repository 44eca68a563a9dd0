"""Writes a Megatron indexed dataset with megatron-core's own IndexedDatasetBuilder and reads it
back with its IndexedDataset; tests/data_prepare.rs checks mixscale reads the same tokens.

megatron-core's package __init__ pulls in its whole training stack, so only
megatron/core/datasets/indexed_dataset.py is loaded, with its storage/logging helpers stubbed
(they are used for S3/MSC paths only). Needs numpy + torch:

    pip download --no-deps megatron-core==0.16.1 -d /tmp/mcore && python -m zipfile -e /tmp/mcore/*.whl /tmp/mcore/x
    PYTHON_WITH_TORCH tests/data/megatron/gen_megatron_fixture.py /tmp/mcore/x tests/data/megatron
"""
import importlib.util
import json
import os
import sys
import types

import numpy
import torch

root, out = sys.argv[1], sys.argv[2]
stubs = {
    "megatron": {}, "megatron.core": {}, "megatron.core.datasets": {},
    "megatron.core.datasets.object_storage_utils": dict.fromkeys(
        ["S3Config", "ObjectStorageConfig", "cache_index_file", "dataset_exists", "get_index_cache_path",
         "get_object_storage_access", "parse_s3_path"], None) | {"is_object_storage_path": lambda p: False},
    "megatron.core.msc_utils": {"MultiStorageClientFeature": type("M", (), {"is_enabled": staticmethod(lambda: False)})},
    "megatron.core.utils": {"log_single_rank": lambda logger, level, msg: None},
}
for name, attrs in stubs.items():
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
spec = importlib.util.spec_from_file_location(
    "megatron.core.datasets.indexed_dataset", os.path.join(root, "megatron/core/datasets/indexed_dataset.py"))
idx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(idx)

os.makedirs(out, exist_ok=True)
prefix = os.path.join(out, "mcore_text_document")
b = idx.IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
docs = [[[5, 6, 7], [8, 9]], [[100, 101, 102, 103]], [[65000, 1, 2, 50256]]]
for d in docs:
    for s in d:
        b.add_item(torch.tensor(s, dtype=torch.int64))
    b.end_document()
b.finalize(prefix + ".idx")
ds = idx.IndexedDataset(prefix)
tokens = [int(t) for i in range(len(ds)) for t in ds[i]]
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"bin": "mcore_text_document.bin", "tokens": tokens, "documents": int(len(ds.document_indices) - 1),
               "generator": "megatron-core 0.16.1 IndexedDatasetBuilder(dtype=uint16), gen_megatron_fixture.py"}, f)
    f.write("\n")
print(tokens, list(ds.document_indices))
