"""One hierarchy for the problems raydpo reports to a user, and their exit codes.

Every job and the `raydpo` CLI map these to an exit status in one place
(`exit_code`); a `RaydpoError` is printed as one line naming the problem, without
a traceback. Anything else is a bug or an infrastructure failure and keeps its
traceback.
"""

from __future__ import annotations


class RaydpoError(Exception):
    """A problem raydpo can name: the message says what is wrong and where."""


class ConfigError(RaydpoError, ValueError):
    """A config (file, key, flag or override) that cannot be used; the message names each bad key."""


class DataError(RaydpoError, ValueError):
    """Input data that cannot be used: a missing file, no usable records, a record that cannot be rendered."""


class SamplerError(RaydpoError, RuntimeError):
    """A sampling request or a weight sync that could not complete."""


class WeightsError(RaydpoError, ValueError):
    """Weights that do not fit the model they are meant for (names, shapes), or a missing folder."""


class JudgeError(RaydpoError, RuntimeError):
    """A judge that cannot be deployed, or that answered what the loop cannot use."""


class TrainerError(RaydpoError, RuntimeError):
    """The trainer role stopped, stalled, or ended without the checkpoint it owes."""


# Exit statuses: 2 for what the user can fix in the command line, config or data (as
# argparse does for a bad flag); 3 for a role that failed while running.
EXIT_CODES: dict[type[RaydpoError], int] = {ConfigError: 2, DataError: 2, WeightsError: 2, SamplerError: 3,
                                            JudgeError: 3, TrainerError: 3}


def exit_code(error: RaydpoError) -> int:
    for kind in type(error).__mro__:
        if kind in EXIT_CODES:
            return EXIT_CODES[kind]
    return 1
