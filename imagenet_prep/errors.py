"""The one exception type that means "the user's input is wrong", not "the code is wrong".

The CLI turns it into one line and exit code 2; library users catch it like any error.
"""


class DataError(Exception):
    """Bad input: a missing folder, an unlabelled image, shards of different builds…

    The message says what was wrong and what to do.
    """
