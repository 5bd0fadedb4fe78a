"""Push a checkpoint to the Hugging Face Hub.

The token comes from huggingface_hub's standard sources (``HF_TOKEN``, ``huggingface-cli login``); llmprune
never reads, prints or logs it. The model card (``README.md``) is regenerated from ``llmprune.json`` and
``eval_results.json`` before the upload, so the card always shows the latest measured numbers.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.checkpoint import read_metadata
from llmprune.publish import modelcard

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
# Never uploaded: temp files of interrupted writes, caches.
IGNORE_PATTERNS = [".*.tmp*", ".*.tmp-*/**", "__pycache__/**", "*.pyc", ".cache/**"]


def check_repo_id(repo_id: str) -> str:
    if not repo_id or not _REPO_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(f"invalid Hub repo id {repo_id!r} (expected user/name)")
    return repo_id


def push(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    write_card: bool = True,
    api=None,
) -> str:
    """Create ``repo_id`` if missing and upload ``directory`` (a checkpoint) to it.

    Args:
        directory: llmprune checkpoint folder.
        repo_id: ``user/name`` (or ``org/name``).
        private: create the repo private (an existing repo's visibility is not changed).
        commit_message: default ``"Upload <name> (llmprune)"``.
        write_card: regenerate ``README.md`` from the checkpoint's metadata and results first.
        api: a ``huggingface_hub.HfApi`` (default: a new one; the token is huggingface_hub's business).

    Returns:
        The repo URL.
    """
    directory = Path(directory)
    check_repo_id(repo_id)
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise LlmpruneError(f"{directory} is not a model directory (no config.json)")
    if write_card:
        if read_metadata(directory) is not None:
            modelcard.write_card(directory, repo_id=repo_id)
        elif not (directory / "README.md").is_file():
            log.warning("%s has no llmprune.json: uploading without a generated model card", directory)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        log.info("uploading %s to %s", directory, repo_id)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(directory),
            commit_message=commit_message or f"Upload {directory.resolve().name} (llmprune)",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except HfHubHTTPError as exc:
        # The message names the repo and status; huggingface_hub never puts the token in it.
        raise LlmpruneError(f"push to {repo_id} failed: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # offline, DNS, ...
        raise LlmpruneError(f"push to {repo_id} failed (is the Hub reachable?): {exc}") from None
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
