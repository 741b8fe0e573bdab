"""The exit codes of every ``graphgrow`` subcommand."""

OK = 0  # done; for check and demo: the models are equivalent
NOT_EQUIVALENT = 1  # the models differ (check, demo), or a rewrite failed its verification (nothing written)
BAD_INPUT = 2  # bad input or option, or a refusal: one line on stderr, nothing written
INTERRUPTED = 130  # Ctrl-C
