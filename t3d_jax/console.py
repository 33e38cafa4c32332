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
