"""The pipeline's own names in an output folder or prefix, kept in one place.

A feature lies in its output under its input's relative path; everything
else the pipeline keeps there lies under one of these names. Only these
top-level folders are the pipeline's: a corpus folder such as ``_extra/``
holds features like any other. An input whose feature would land inside
one of them (``_models/Actor_01/x.npy``) is refused when the run is
planned (``own_folder_reason``), so a feature never mixes with, or
overwrites, the pipeline's records.
"""

from __future__ import annotations

# Each shard's last result (``<id>.json``), its lineage records
# (``lineage``) and, for a local output, its claim locks (``runner``).
SHARDS_DIR = "_shards"
# Each run's shard plans, every file named by its SHA-256 (``plan``).
PLANS_DIR = "_plans"
# Copies of the model, fetched by workers on hosts without its file (``shipping``).
MODELS_DIR = "_models"
# Feature files verification moved out of the feature space (``verify``).
ORPHANS_DIR = "_orphans"
# Each running shard's lease on an S3 output, guarding its files across hosts (``lease``).
LEASES_DIR = "_leases"
# Which model writes this output's features (``plan.claim_output``).
FEATURES_META = "_features.json"
# A passing dataset's list of verified features, and every verification's report (``verify``).
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "verification_report.json"
# Top-level folders that hold no features.
OWN_DIRS = frozenset({SHARDS_DIR, PLANS_DIR, MODELS_DIR, ORPHANS_DIR, LEASES_DIR})


def is_own(rel: str) -> bool:
    """Tell whether ``rel`` (relative to an output) lies in one of the pipeline's own folders."""
    return rel.split("/", 1)[0] in OWN_DIRS


def own_folder_reason(rel: str) -> str | None:
    """Return why an input at ``rel`` cannot be extracted because its feature would lie in a pipeline folder, or None."""
    top = rel.split("/", 1)[0]
    if "/" in rel and top in OWN_DIRS:
        return (
            f"{rel}: its feature would lie in the output's {top}/ folder, which holds the pipeline's own records; "
            "refused (rename the input folder)"
        )
    return None
