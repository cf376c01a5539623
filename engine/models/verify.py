"""`python -m engine.models.verify`: check the installed Silero model is the pinned one."""

from __future__ import annotations

import sys

from engine.models.silero import SILERO_SHA256, SILERO_VERSION, default_model_path, file_sha256


def main() -> int:
    path = default_model_path()
    digest = file_sha256(path)
    if digest != SILERO_SHA256:
        print(f"{path}: sha256 {digest} != pinned {SILERO_SHA256} (silero-vad {SILERO_VERSION})", file=sys.stderr)
        return 1
    print(f"model ok: {path} sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
