"""Push a checkpoint to the Hugging Face Hub.

The token comes from huggingface_hub's standard sources (``HF_TOKEN``, ``hf auth login``); llmprune never
reads, prints or logs it. The model card (``README.md``) is regenerated from ``llmprune.json`` and
``eval_results.json`` for every upload, so the card always shows the latest measured numbers.

What is uploaded is a staging folder (links to the checkpoint's files): the generated card and copies of
llmprune's own JSON files (``llmprune.json``, ``eval_results.json``, ``attn_gates.json``) with local paths
rewritten (:func:`llmprune.publish.paths.public_json`). The checkpoint is not modified before the upload
succeeds (a failed push leaves no ``README.md`` behind, a read-only checkpoint can be pushed); after it, the
card is also written into the checkpoint when the folder is writable.

:func:`check_push` is the pre-flight of ``compress --push-to-hub``: repo id, token and Hub checked before
the long compress. :func:`hub_error_message` turns Hub-client errors (offline mode, connection failures,
HTTP errors, a missing token) into one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmprune.errors import ConfigError, LlmpruneError
from llmprune.formats.checkpoint import read_metadata
from llmprune.publish import modelcard
from llmprune.publish.paths import public_json, public_text

log = logging.getLogger(__name__)

_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
# Never uploaded: temp files of interrupted writes, caches.
IGNORE_PATTERNS = [".*.tmp*", ".*.tmp-*/**", "__pycache__/**", "*.pyc", ".cache/**"]
#: llmprune's own JSON files: uploaded with local paths rewritten (the checkpoint's copies are left as they are).
PUBLIC_JSON = ("llmprune.json", "eval_results.json", "attn_gates.json")
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp"}
_UNREACHABLE_HINTS = ("Connect", "Timeout", "Network", "Proxy", "Transport", "SSL")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _http_error(exc: BaseException) -> str:
    """First line of an ``HfHubHTTPError`` (which names the status), with the status added when it does not."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = _first_line(exc)
    return f"HTTP {status}: {text}" if status and str(status) not in text else text


def hub_error_message(exc: BaseException) -> str | None:
    """One line for an error of the Hugging Face Hub client (or the HTTP libraries under it), else None.

    Offline mode and connection failures: ``cannot reach the Hugging Face Hub: ...``; a missing token, an
    invalid repo id, HTTP errors (401, 403, 404 ...): what the Hub said.
    """
    mro = type(exc).__mro__
    names = {c.__name__ for c in mro}
    modules = {c.__module__.split(".")[0] for c in mro}
    if "OfflineModeIsEnabled" in names:
        return ("cannot reach the Hugging Face Hub: offline mode is enabled (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
                "is set)")
    if "LocalTokenNotFoundError" in names:
        return "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"
    if "HFValidationError" in names:
        return f"invalid Hugging Face Hub name: {_first_line(exc)}"
    if "HfHubHTTPError" in names:
        return f"Hugging Face Hub request failed: {_http_error(exc)}"
    if modules & _NETWORK_MODULES:
        if any(h in n for n in names for h in _UNREACHABLE_HINTS) or "ConnectionError" in names:
            return f"cannot reach the Hugging Face Hub: {_first_line(exc)}"
        return f"Hugging Face Hub request failed: {_first_line(exc)}"
    return None


def check_repo_id(repo_id: str) -> str:
    if not repo_id or not _REPO_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(f"invalid Hub repo id {repo_id!r} (expected user/name)")
    return repo_id


def check_push(repo_id: str, *, api=None) -> None:
    """Pre-flight of an upload, before any long work: ``repo_id`` valid, a token present and accepted by a
    reachable Hub (one ``whoami`` call), and not a read-only token.

    Raises:
        LlmpruneError: naming what is wrong.
    """
    check_repo_id(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        info = api.whoami()
    except Exception as exc:
        msg = hub_error_message(exc)
        if msg is None:
            raise
        if getattr(getattr(exc, "response", None), "status_code", None) == 429:  # whoami's strict rate limit
            log.warning("could not check the Hugging Face token before the run (%s)", msg)
            return
        raise LlmpruneError(f"cannot push to {repo_id}: {msg}") from None
    auth = info.get("auth") if isinstance(info, dict) else None
    token = auth.get("accessToken") if isinstance(auth, dict) else None
    if isinstance(token, dict) and token.get("role") == "read":
        raise LlmpruneError(f"cannot push to {repo_id}: the Hugging Face token is read-only (a write token is needed)")


def _stage(directory: Path, staging: Path, card: str | None) -> None:
    """Fill ``staging`` with links to ``directory``'s files, the card, and public copies of :data:`PUBLIC_JSON`."""
    for src in sorted(directory.rglob("*")):
        if src.is_dir():
            continue
        rel = src.relative_to(directory)
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in PUBLIC_JSON:
            try:
                data = json.loads(src.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise LlmpruneError(f"{src} is not valid JSON; fix or remove it before pushing") from None
            dst.write_text(json.dumps(public_json(data, directory), indent=2) + "\n")
        elif card is not None and rel.as_posix() in (modelcard.CARD_FILE, modelcard.RECIPE_FILE):
            continue
        else:
            try:
                os.symlink(src.resolve(), dst)
            except OSError:  # no symlinks here (some Windows setups): copy
                shutil.copy2(src, dst)
    if card is not None:
        (staging / modelcard.CARD_FILE).write_text(card, encoding="utf-8")
        meta = read_metadata(directory)
        if meta is not None:  # the recipe beside the card, reusable with --recipe
            (staging / modelcard.RECIPE_FILE).write_text(public_text(modelcard.recipe_yaml(meta), directory),
                                                         encoding="utf-8")


def push(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    write_card: bool = True,
    api=None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` if missing and upload ``directory`` (a checkpoint) to it.

    Args:
        directory: llmprune checkpoint folder.
        repo_id: ``user/name`` (or ``org/name``).
        private: create the repo private (an existing repo's visibility is not changed).
        commit_message: default ``"Upload <name> (llmprune)"``.
        write_card: upload a ``README.md`` generated from the checkpoint's metadata and results (also written
            into the checkpoint after a successful upload, when the folder is writable).
        api: a ``huggingface_hub.HfApi`` (default: a new one; the token is huggingface_hub's business).
        revision: the branch to upload to (created from main when missing; default main).
        create_pr: open a pull request with the upload instead of committing to the branch.
        token: a Hugging Face token (default: huggingface_hub's own sources); never printed or logged.

    Returns:
        The repo URL.

    Raises:
        LlmpruneError: a bad repo id or directory, or a failed upload (one line; the checkpoint unchanged).
    """
    directory = Path(directory)
    check_repo_id(repo_id)
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise LlmpruneError(f"{directory} is not a model directory (no config.json)")
    card = None
    if write_card:
        if read_metadata(directory) is not None:
            card = modelcard.build_card(directory, repo_id=repo_id)
        elif not (directory / modelcard.CARD_FILE).is_file():
            log.warning("%s has no llmprune.json: uploading without a generated model card", directory)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="llmprune-push-") as tmp:
        staging = Path(tmp) / directory.resolve().name
        staging.mkdir()
        _stage(directory, staging, card)
        try:
            url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and not create_pr:
                api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
            log.info("uploading %s to %s%s", directory, repo_id, f" ({revision})" if revision else "")
            extra = {k: v for k, v in (("revision", revision), ("create_pr", create_pr)) if v}
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=str(staging),
                commit_message=commit_message or f"Upload {directory.resolve().name} (llmprune)",
                ignore_patterns=IGNORE_PATTERNS,
                **extra,
            )
        except Exception as exc:
            # The messages name the repo and status; huggingface_hub never puts the token in them.
            if "HfHubHTTPError" in {c.__name__ for c in type(exc).__mro__}:
                msg = _http_error(exc)  # "403 Forbidden: ..." says it all
            else:
                msg = hub_error_message(exc)
            if msg is None and not isinstance(exc, OSError):
                raise
            raise LlmpruneError(f"push to {repo_id} failed: {msg or _first_line(exc)}") from None
    if card is not None:
        try:
            modelcard.write_card(directory, repo_id=repo_id, text=card)
        except OSError as exc:  # a read-only checkpoint: the card is on the Hub
            log.info("model card not written into %s (%s)", directory, exc.strerror or exc)
    pr_url = getattr(commit, "pr_url", None) if create_pr else None
    return str(pr_url or getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")
