"""Errors a user can fix. CLIs print them as one line ("Error: ...") and exit 1.

Every message says what was expected, what was found, and how to fix it. Anything that is not an
`S2SError` is a bug and keeps its traceback.
"""


class S2SError(Exception):
    """Base class of every error a user can act on."""


class ExportDirError(S2SError):
    """An export directory is missing, incomplete or unreadable (manifest, graph, tokenizer)."""


class ManifestVersionError(S2SError):
    """s2s.json was written by a newer or older, incompatible exporter."""


class ProviderUnavailableError(S2SError):
    """The requested execution provider cannot run here (e.g. CUDA without onnxruntime-gpu)."""


class UnsupportedModelError(S2SError):
    """The model is not an encoder-decoder this tool can export (encoder-only, decoder-only, unknown)."""


class InvalidOptionError(S2SError):
    """A generation or export option has a value outside its range, or options contradict each other."""


class InvalidInputError(S2SError):
    """The input itself cannot be processed: empty, too long for the model, wrong shape or dtype."""


class InputItemError(InvalidInputError):
    """One input among many cannot be processed (empty, too long). `index` is its 0-based position
    among the inputs and `problem` what is wrong with it ("is empty; ..."), so that a caller reading
    lines can name the line instead of the position."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"input {index + 1} {problem}")
        self.index = index
        self.problem = problem

    def __reduce__(self):  # pickled with its fields (a Ray worker's error travels to the driver)
        return (type(self), (self.index, self.problem))


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters (its type's name if the
    message is empty): how another library's many-line error is quoted in one of ours."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
