"""The data layer's error: the message names the file and the fix."""


class DataError(ValueError):
    pass
