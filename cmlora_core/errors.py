"""The pack's error type: every message names the node, the input and the fix."""
from __future__ import annotations


class CMLoRAError(ValueError):
    """A user-facing error raised for bad input or an unsupported setup.

    ``node`` is the display name of the node, ``input`` the input at fault (or ``None``),
    ``problem`` what is wrong and ``fix`` what the artist can do about it.
    """

    def __init__(self, node: str, input: str | None, problem: str, fix: str = ""):
        self.node, self.input, self.problem, self.fix = node, input, problem, fix
        where = f"[{node}]" + (f" input '{input}'" if input else "")
        text = f"{where}: {problem}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)
