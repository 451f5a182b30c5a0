"""Exceptions every step raises for bad input, so entry points can report them cleanly."""


class FacenetError(Exception):
    """Base class: a step cannot continue; the message names the file, key or value at fault."""


class InputError(FacenetError):
    """An input file, artifact or parameter is missing, malformed or out of range."""


class DownloadError(FacenetError):
    """A source could not be fetched or did not verify."""
