"""Read a JSON file that must hold an object (s2s.json, config.json, generation_config.json, ...).

Standard library only, like runtime/manifest.py: the exporter and models/ use it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.errors import S2SError


def read_json_object(path: Path, error: type[S2SError], fix: str) -> dict[str, Any]:
    """The object in `path`, as a dict.

    error: the S2SError subclass to raise; fix: what the user should do, ending its message
    ("re-export the model").

    Raises:
        error: the file cannot be read, is not JSON, or holds something other than an object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"cannot read {path}: it is not valid JSON ({err}); {fix}") from None
    except OSError as err:
        raise error(f"cannot read {path} ({err.strerror or err}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}; {fix}")
    return value
