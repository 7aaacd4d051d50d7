"""Where the real agent CLIs live for the provider tests: `.ci/real-tools`
installs pinned `@anthropic-ai/claude-code` and `@openai/codex` from npm into
the user cache folder. Tests that need one skip only when it is absent (a
developer machine without npm); `.ci/run` always installs them."""

import os
import shutil

NPM_PREFIX = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                          "agent-relay-ci", "npm")


def real_tool(name):
    """The path of the pinned `claude` or `codex` binary, or None."""
    path = os.path.join(NPM_PREFIX, "node_modules", ".bin", name)
    return path if os.access(path, os.X_OK) else None


def node_available():
    return shutil.which("node") is not None
