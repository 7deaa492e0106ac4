"""A small in-memory Hugging Face Hub for the test suite.

`LocalHub` serves the subset of the Hub's HTTP API that `huggingface_hub` 2.4 uses for model repos, so the
real client can run against it through `HF_ENDPOINT=http://127.0.0.1:PORT`. It is stdlib only and keeps
everything in memory.

What it implements:

* users and Bearer tokens (`/api/whoami-v2`), organisations as extra writable namespaces, and fine-grained
  tokens whose `repo.write` permission is scoped to namespaces or repos (enforced on writes);
* model repos with git-like history: branches, tags, pull-request refs (`refs/pr/N`), commits whose files
  are content-addressed blobs; a new repo starts with one commit holding `.gitattributes`, as on the Hub;
* reads: repo info (`?blobs=true` siblings, `cardData` from the README front matter when PyYAML is
  importable), tree listings with real git blob sha1 oids and LFS sha256 oids, commit and ref listings,
  `HEAD`/`GET /resolve` with the metadata headers the client requires and single byte ranges (206);
* writes: repo creation, `validate-yaml`, preupload (upload modes and remote oids, so unchanged files are
  skipped by the client), the LFS batch API with a one-shot capability URL for the `PUT` and a verify
  URL, ndjson commits (regular files, LFS pointers, file and folder deletions, `parentCommit` checks,
  `create_pr=1`), branches and pull requests through the discussions API;
* the Hub's access rules as the client sees them: private repos are hidden behind 404 `RepoNotFound`,
  gated repos answer 401 `GatedRepo` to anonymous readers, and every error carries `X-Error-Code` /
  `X-Error-Message`, because on `http://` the client only maps errors from those headers;
* a request log (with the `Range` header of each request) and fault injection: error answers (`fail_next`),
  connections closed before the answer (`drop_next`) or halfway through its body (`cut_next`), and requests
  held until the test releases them (`hold_next`).

What it deliberately does not implement:

* Xet. The server never sends `X-Xet-Hash` or tree `xetHash`, so downloads stay plain HTTP. Uploads of LFS
  files go to Xet whenever `hf_xet` is importable, and no server answer can prevent that: clients must run
  with `HF_HUB_DISABLE_XET=1`, which makes them use the LFS "basic" transfer served here.
* Datasets, Spaces, repo ids without a namespace, paths-info, file copies, LFS multipart uploads, LFS
  downloads through the batch API, pagination (every listing fits in one page), repo settings, and commits
  opened as pull requests by users without write access to the namespace (the Hub allows those).
"""

from __future__ import annotations

from .faults import Hold, RequestRecord
from .http import HubError
from .hub import LocalHub
from .storage import (
    LFS_MIN_SIZE,
    LFS_SUFFIXES,
    DiskFile,
    HubCommit,
    PullRequest,
    SparseFile,
    git_blob_sha1,
    is_lfs,
    lfs_pointer,
)

__all__ = [
    "LFS_MIN_SIZE",
    "LFS_SUFFIXES",
    "DiskFile",
    "Hold",
    "HubCommit",
    "HubError",
    "LocalHub",
    "PullRequest",
    "RequestRecord",
    "SparseFile",
    "git_blob_sha1",
    "is_lfs",
    "lfs_pointer",
]
