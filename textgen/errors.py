"""The one exception type for mistakes a user can make (a bad file, flag or checkpoint).

Entry points print its message as one sentence and exit with code 2; anything
else that escapes is a bug in textgen and keeps its traceback.
"""


class UsageError(Exception):
    pass
