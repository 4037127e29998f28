#!/usr/bin/env python3
"""Lays out a Hugging Face hub cache holding model ORG/NAME with the given files, the way
huggingface_hub's downloader writes one (its own helpers: repo_folder_name for the folder, blobs
named by content hash, snapshot files made by _create_symlink, refs/main written by
_cache_commit_hash_for_specific_revision), then asks the library to resolve it offline
(snapshot_download with local_files_only, and try_to_load_from_cache for each file), and prints
what it answers as JSON: {"snapshot": DIR, "files": {name: path}}. tests/hub.rs checks that
zerokit's resolver (lib/hub.rs) finds the same folder. Nothing is downloaded.

    python3 tools/make_hub_cache.py --cache DIR --repo ORG/NAME [--revision HASH] FILE[=NAME] ...
"""
import argparse
import hashlib
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
from huggingface_hub import snapshot_download, try_to_load_from_cache  # noqa: E402
from huggingface_hub import file_download as fd  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--revision", default="0123456789abcdef0123456789abcdef01234567", help="the commit hash")
    ap.add_argument("files", nargs="+", help="FILE or FILE=NAME_IN_REPO")
    a = ap.parse_args()
    storage = os.path.join(a.cache, fd.repo_folder_name(repo_id=a.repo, repo_type="model"))
    for spec in a.files:
        src, _, name = spec.partition("=")
        name = name or os.path.basename(src)
        with open(src, "rb") as f:
            etag = hashlib.sha256(f.read()).hexdigest()
        blob = os.path.join(storage, "blobs", etag)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        shutil.copyfile(src, blob)
        pointer = os.path.join(storage, "snapshots", a.revision, name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        fd._create_symlink(blob, pointer, new_blob=False)
    # What the downloader does after fetching from branch "main".
    fd._cache_commit_hash_for_specific_revision(storage, "main", a.revision)
    snap = snapshot_download(a.repo, cache_dir=a.cache, local_files_only=True)
    files = {}
    for spec in a.files:
        src, _, name = spec.partition("=")
        name = name or os.path.basename(src)
        files[name] = try_to_load_from_cache(a.repo, name, cache_dir=a.cache)
    print(json.dumps({"snapshot": snap, "files": files}))


if __name__ == "__main__":
    main()
