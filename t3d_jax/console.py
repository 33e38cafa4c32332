"""Console hygiene shared by the launchers."""

from __future__ import annotations

import logging as pylogging

from absl import logging


class QuietLibraries(pylogging.Filter):
    """Keeps orbax's/grain's per-save and per-restore INFO chatter off the console (warnings
    still show); --verbosity=1 shows everything."""

    NOISY = ("/orbax/", "/grain/", "/etils/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.WARNING or logging.get_verbosity() >= 1:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
    """Installs :class:`QuietLibraries` on absl's handler (call at the start of ``main``)."""
    logging.get_absl_handler().addFilter(QuietLibraries())


# -- launchers fail like tools --------------------------------------------------------------------

def _prog() -> str:
    import os
    import sys

    path = os.path.abspath(sys.argv[0])
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{os.path.basename(path)}" if parent == "launch" else os.path.basename(path)


def _flags_parser(argv):
    """absl's flag parsing, with a bad flag or config (e.g. an unknown variant, which
    ml_collections reports with the config file's traceback) as one line."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else str(e)
        for prefix in ("ValueError: ", "KeyError: ", "FileNotFoundError: "):
            last = last.removeprefix(prefix)
        raise SystemExit(f"{_prog()}: {last}") from None


def run_tool(main) -> None:
    """`absl.app.run(main)` for a launcher: an expected user error (`t3d_jax.utils.UserError`,
    a bad flag, an unknown config variant) ends with one line naming the problem and a non-zero
    exit; anything else is a bug and keeps its traceback."""
    from absl import app

    from t3d_jax.utils import UserError

    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            raise SystemExit(f"{_prog()}: {e}") from None

    app.run(wrapped, flags_parser=_flags_parser)
