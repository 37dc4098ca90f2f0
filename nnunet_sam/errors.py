"""The one exception type users see: a one-line message that names the file and the fix.

The library names its settings (arguments such as `grid` or `checkpoint`), never command-line flags: a message that
names settings is a `SettingText` (an error: `SettingError`) whose `{setting}` fields are filled in when it is
shown, with the setting names, or, inside `setting_names` (what a console script uses), with its flags."""

from __future__ import annotations

import functools
import os
import string
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping


class NnsamError(Exception):
    """Bad input or setup. The message is a single line meant for the user."""


_setting_names: Mapping[str, str] = {}  # how the running program names settings (see `setting_names`)


@contextmanager
def setting_names(names: Mapping[str, str]) -> Iterator[None]:
    """Inside: a `SettingText` or `SettingError` shows setting `s` as `names[s]` (a console script: its flag)."""
    global _setting_names
    previous, _setting_names = _setting_names, dict(names)
    try:
        yield
    finally:
        _setting_names = previous


class SettingText:
    """Text that names settings: `template` is a str.format template whose fields are either in `values` or
    setting names, e.g. SettingText("{grid} {value}: use a smaller {grid}", value=40). Shown (str) with the
    names `setting_names` gives, else the settings' own. Pass one as a logging message to log it so."""

    def __init__(self, template: str, **values: object) -> None:
        self.template, self.values = template, values

    @property
    def settings(self) -> tuple[str, ...]:
        """The setting names the text mentions, in order."""
        fields = (name for _, name, _, _ in string.Formatter().parse(self.template) if name)
        return tuple(dict.fromkeys(name for name in fields if name not in self.values))

    def __str__(self) -> str:
        names = {name: _setting_names.get(name, name) for name in self.settings}
        return self.template.format(**self.values, **names)


class SettingError(NnsamError):
    """An NnsamError about settings; its message is a `SettingText` (same arguments) and `settings` names them."""

    def __init__(self, template: str, **values: object) -> None:
        super().__init__(template)
        self.text = SettingText(template, **values)

    @property
    def settings(self) -> tuple[str, ...]:
        return self.text.settings

    def __str__(self) -> str:
        return str(self.text)

    def __reduce__(self):  # pickled (e.g. from a worker process) with its values
        return functools.partial(type(self), **self.text.values), (self.text.template,)


def one_line_errors_at_top_level() -> None:
    """In a program that is not ours (nnUNetv2_train running one of our trainers), an NnsamError nobody catches
    prints one line, `nnunet-sam: error: MESSAGE`, and exits with status 2, as our commands do; every other
    exception keeps Python's traceback. Installed only over Python's default hook (never over someone else's)."""
    if sys.excepthook is not sys.__excepthook__:
        return

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, NnsamError):
            sys.__excepthook__(kind, value, traceback)
            return
        sys.stdout.flush()
        sys.stderr.write(f"nnunet-sam: error: {value}\n")
        sys.stderr.flush()
        os._exit(2)  # an excepthook cannot choose the exit status otherwise (SystemExit is not raised from it)

    sys.excepthook = hook
