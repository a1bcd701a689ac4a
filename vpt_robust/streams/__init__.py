"""New domain streams: folders of images that arrive, are versioned, adapted on and kept.

Plain functions, no orchestration (``flows/stream.py`` wraps them in Prefect tasks;
``vpt-robust stream PATH`` calls them directly): ``inbox`` validates a folder, hashes its
content the way DVC does and watches the inbox; ``registry`` keeps the adapted versions with an
atomic "latest"; ``adapt`` adapts on one folder from the latest state, with checkpoint/resume,
evaluates, logs to MLflow and saves the new version.
"""

from vpt_robust.streams.adapt import (
    StreamModel,
    list_versions,
    load_source_model,
    process_folder,
    store_root,
)
from vpt_robust.streams.inbox import InboxWatcher, StreamFolderError, validate_folder
from vpt_robust.streams.registry import Registry, VersionError

__all__ = [
    "InboxWatcher",
    "Registry",
    "StreamFolderError",
    "StreamModel",
    "VersionError",
    "list_versions",
    "load_source_model",
    "process_folder",
    "store_root",
    "validate_folder",
]
