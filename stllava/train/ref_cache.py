"""The cache of precomputed DPO reference log-probs (``--precompute_ref_log_probs``): its
fingerprint (what the numbers depend on), reading and atomic writing.

The file (``--ref_log_probs_path``, default ``<output_dir>/ref_log_probs.json``) holds
``{"settings": fingerprint, "ref_logps": {record index: [chosen, rejected]}}`` (the marker form of
:mod:`stllava.artifacts`; a file written before it, with the fingerprint under ``"fingerprint"``,
is still read); a run reuses it only when its fingerprint matches and it covers every training
record. Any other cache is recomputed, with a log line naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from stllava import artifacts

logger = logging.getLogger(__name__)

REF_CACHE_NAME = "ref_log_probs.json"


def ref_cache_fingerprint(model_args, data_args, training_args, dtype: torch.dtype, source: dict) -> dict:
    """What precomputed reference log-probs depend on: the data file (path and SHA-256), the start
    model's sources, the weights re-loaded over it, the template, image handling, length and dtype."""
    h = hashlib.sha256()
    with open(data_args.data_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    def absolute(p):
        return os.path.abspath(p) if p and os.path.exists(p) else p

    return {"data_path": os.path.abspath(data_args.data_path), "data_sha256": h.hexdigest(),
            "image_folder": absolute(data_args.image_folder), **{k: absolute(v) for k, v in source.items()},
            "vision_tower": absolute(model_args.vision_tower),
            "pretrain_mm_mlp_adapter": absolute(model_args.pretrain_mm_mlp_adapter), "version": model_args.version,
            "image_aspect_ratio": data_args.image_aspect_ratio, "model_max_length": training_args.model_max_length,
            "dtype": str(dtype)}


def read_ref_cache(path: str | None, fingerprint: dict, indices) -> dict[int, tuple[float, float]] | None:
    """The cached reference log-probs ``{record index: (chosen, rejected)}`` of ``path``, or None when the
    file is absent, its fingerprint differs from ``fingerprint`` or it misses one of ``indices`` (logged)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        cache = {int(k): (float(v[0]), float(v[1])) for k, v in raw["ref_logps"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        logger.warning("ignoring reference log-prob cache %s: unreadable (%s); recomputing", path, e)
        return None
    stale = artifacts.mismatch(artifacts.recorded_settings(raw), fingerprint)
    if stale:
        logger.warning("ignoring reference log-prob cache %s: %s; recomputing", path, stale)
        return None
    missing = [i for i in indices if i not in cache]
    if missing:
        logger.warning("ignoring reference log-prob cache %s: it lacks %d records (e.g. %s); recomputing", path,
                       len(missing), missing[:3])
        return None
    logger.info("reusing reference log-probs of %d records from %s", len(cache), path)
    return cache


def write_ref_cache(path: str, fingerprint: dict, cache: dict[int, tuple[float, float]]) -> None:
    """Write the cache atomically (floats round-trip exactly through JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(artifacts.marker(fingerprint, ref_logps={str(k): list(v) for k, v in sorted(cache.items())}), f)
    os.replace(tmp, path)
