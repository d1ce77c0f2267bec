"""Pseudonymisation: salted hashes instead of patient, series and instance identifiers.

No PatientName, PatientBirthDate or original PatientID reaches a record, a manifest or a
log line. Identifiers become ``P`` / ``S`` / ``I`` + 16 hex digits of an HMAC-SHA256 under
a secret salt; with the same salt the same patient gets the same pseudonym (so re-running a
conversion reproduces its output), and without the salt a pseudonym cannot be checked
against a guessed identifier.

The salt comes from, in order: the ``--salt`` option, the ``TFCOVSEG_SALT`` environment
variable, or a random key created once in ``~/.config/tfcovseg/pseudonym.key`` (mode 600).
Keep that key with the data's owner, not with the records.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import warnings
from pathlib import Path

KEY_FILE = Path.home() / ".config" / "tfcovseg" / "pseudonym.key"


def resolve_salt(salt: str | bytes | None = None) -> bytes:
    """The salt to use: the argument, $TFCOVSEG_SALT, or the per-user key file. Bytes are
    a salt resolved already (a pipeline resolves it where it starts and passes it on)."""
    if isinstance(salt, bytes) and salt:
        return salt
    if salt:
        return salt.encode("utf-8")
    env = os.environ.get("TFCOVSEG_SALT")
    if env:
        return env.encode("utf-8")
    if not KEY_FILE.is_file():
        KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return KEY_FILE.read_text().strip().encode("utf-8")


def salt_option(text: str) -> str:
    """argparse type of a ``--salt``: an empty one (``--salt "$UNSET"``) fell back to
    the key file without a word, giving other pseudonyms than the user meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty (leave --salt out for $TFCOVSEG_SALT or the key file)"
        )
    return text


def pseudonym(kind: str, identifier: str, salt: bytes) -> str:
    """``kind`` letter + 16 hex digits of HMAC-SHA256(salt, kind:identifier)."""
    digest = hmac.new(salt, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}{digest[:16]}"


_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")


class Redactor:
    """Replaces known original identifiers (ids, names, UIDs) in text shown to the user.

    As one alternation of every identifier would (leftmost match first, the longest of
    those starting there), but identifiers of digits and dots (UIDs, numeric patient ids:
    one per file read, millions in an archive) are looked up in a dict within the text's
    runs of digits and dots: a regular expression over 50,000 UIDs took 4 s to build and
    150 ms a call. The others (names, ids) form one alternation, built after an `add`,
    that also matches them in other case.
    """

    def __init__(self):
        self._map: dict[str, str] = {}  # other identifiers, as added: replacement
        self._folded: dict[str, str] = {}  # the same by `str.casefold`
        self._numbers: dict[str, str] = {}  # identifiers of digits and dots
        self._longest = 0  # the longest of those
        self._pattern = None  # the alternation of `_map`, None after an add

    def add(self, original: str, replacement: str) -> None:
        original = str(original).strip()
        for variant in _variants(original):
            if len(variant) < 3:  # never redact trivially short strings such as "1"
                continue
            if _DIGITS_AND_DOTS.fullmatch(variant):
                self._numbers[variant] = replacement
                self._longest = max(self._longest, len(variant))
            elif self._map.get(variant) != replacement:
                self._map[variant] = replacement
                self._folded[variant.casefold()] = replacement
                self._pattern = None

    def __call__(self, text: str) -> str:
        text = str(text)
        if self._map and self._pattern is None:
            self._pattern = re.compile(_trie_pattern(self._map), re.IGNORECASE)
        out, i = [], 0
        while True:
            name = self._pattern.search(text, i) if self._map else None
            number = self._number(text, i)
            if name is None and number is None:
                break
            if number is None or (
                name is not None and (name.start(), -name.end()) <= (number[0], -number[1])
            ):
                start, end, replacement = name.start(), name.end(), self._name(name.group(0))
            else:
                start, end, replacement = number
            out += [text[i:start], replacement]
            i = end
        return "".join(out) + text[i:]

    def _name(self, found: str) -> str:
        """The replacement of a name the alternation found (in any case)."""
        replacement = self._map.get(found) or self._folded.get(found.casefold())
        if replacement is None:  # case rules casefold does not share with re
            key = next(k for k in self._map if re.fullmatch(re.escape(k), found, re.I))
            replacement = self._map[key]
        return replacement

    def _number(self, text: str, i: int):
        """(start, end, replacement) of the leftmost, longest identifier of digits and
        dots in `text` from `i`, or None."""
        if not self._numbers:
            return None
        for run in _DIGITS_AND_DOTS.finditer(text, i):
            a, b = run.span()
            for k in range(a, b - 2):
                for j in range(min(b, k + self._longest), k + 2, -1):  # longest first
                    if text[k:j] in self._numbers:
                        return k, j, self._numbers[text[k:j]]
        return None


def _trie_pattern(keys) -> str:
    """A regular expression matching any of `keys`, the longest where several start at
    the same place (as their alternation sorted longest first), as a trie: the engine
    follows one branch per character instead of trying every key (10,000 patients'
    names: 33 ms a call as an alternation)."""
    root: dict = {}
    for key in keys:
        node = root
        for char in key:
            # One branch for both cases ("Doe" and "DOE^JOHN": the engine took the first
            # branch that matched, and left " JOHN"); a letter whose lower case is longer
            # (İ) keeps its own.
            lower = char.lower()
            node = node.setdefault(lower if len(lower) == 1 else char, {})
        node[""] = {}  # a key ends here

    def pattern(node) -> str:
        branches = [re.escape(c) + pattern(child) for c, child in node.items() if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Longer keys first: a branch when one goes on, the end of a key after it.
        return f"(?:{body})?" if "" in node else body

    return pattern(root)


def _variants(original: str) -> list[str]:
    """An identifier as paths and logs may write it: DICOM person names (FAMILY^GIVEN^...)
    with spaces or underscores between their parts, and given name first."""
    variants = [original]
    if "^" in original:
        parts = [p for p in original.split("^") if p]
        for sep in (" ", "_"):
            variants.append(original.replace("^", sep))
            variants.append(sep.join(parts))
            if len(parts) >= 2:
                variants.append(sep.join([parts[1], parts[0]]))
    return list(dict.fromkeys(variants))


# Libraries that read or write DICOM headers and may quote their values in warnings.
_DICOM_LOGGERS = ("pydicom", "highdicom")


@contextlib.contextmanager
def held_warnings():
    """Yields the list that collects the block's warnings (the `warnings` module and the
    pydicom / highdicom loggers) as text, in the order they come, instead of showing
    them. An entry may be set to ``(text, where)`` (`locate`) to say which file it is
    about."""
    held: list = []

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(f"{record.name}: {record.getMessage()}")

    def hold(message, category, *args, **kwargs):
        held.append(f"{category.__name__}: {message}")

    handler = _Hold(logging.WARNING)
    loggers = [logging.getLogger(name) for name in _DICOM_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = hold  # restored by catch_warnings
            yield held
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate


# A quoted value in a library's message, as Python's repr quotes it: '...', "..." or a
# bytes repr b'...', a quote of the same kind inside escaped.
_QUOTED = re.compile(r"""(?<![A-Za-z])b?('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.S)
# A control character, or its escape in a repr (an odd number of backslashes before it:
# a Windows path's doubled "\\temp" is no tab).
_CONTROL = re.compile(r"[\x00-\x1f]|(?<!\\)(?:\\\\)*\\(?:x[01][0-9a-fA-F]|[tnr0])")


def elide_raw(text) -> str:
    """`text` with each quoted value that holds control characters (raw header bytes, not
    one value: DICOM's text values hold none) replaced by a placeholder.

    When a damaged length or VR makes pydicom read past an element, its warnings and
    errors quote the bytes it took for the value: the elements that follow, the patient's
    name and ID among them, from a file whose identities the redactor never learnt
    (the header did not parse). Element tags and lengths always hold zero bytes."""

    def replace(match: re.Match) -> str:
        raw = _CONTROL.search(match.group(0))
        return "<header bytes not shown>" if raw else match.group(0)

    return _QUOTED.sub(replace, str(text))


def printable(text) -> str:
    """`text` as any console prints it: a file name that is not UTF-8 (Python keeps its
    bytes as surrogates) shown with backslash escapes instead of failing the print."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def locate(held: list, since: int, where: str) -> None:
    """Marks the warnings held from index `since` on as about the file `where`."""
    held[since:] = [(text, where) for text in held[since:]]


def warning_lines(held, redactor: Redactor) -> list[str]:
    """The held warnings as lines to show, redacted: each text once, in order (pydicom
    logs and warns the same text: once), with the file it is about, or how many files
    and the first ("Invalid value for VR UI ... (1,035 files, e.g. case_0000/ct/IM1)")."""
    seen: dict[str, list] = {}
    for entry in held:
        text, where = entry if isinstance(entry, tuple) else (entry, None)
        text = redactor(elide_raw(text))
        key = text.partition(": ")[2] or text
        places = seen.setdefault(key, [text, []])[1]
        if where is not None and where not in places:
            places.append(where)
    lines = []
    for text, places in seen.values():
        if len(places) == 1:
            text = f"{redactor(places[0])}: {text}"
        elif places:
            text += f" ({len(places):,} files, e.g. {redactor(places[0])})"
        lines.append(text)
    return lines


@contextlib.contextmanager
def redacted_warnings(redactor: Redactor, stream=None):
    """Holds back the warnings of the block (`held_warnings`), then shows each once,
    redacted, on `stream` (stderr); yields the list, for warnings held elsewhere (worker
    processes) to be added.

    pydicom and highdicom quote header values in their warnings (highdicom: 'The string
    "A072894" is unlikely to represent ... person name'); shown as they happen they would
    print a patient's name before the redactor knows it. Held to the end of the block,
    every identity met in the meantime is known.
    """
    held: list[str] = []
    try:
        with held_warnings() as caught:
            held = caught
            yield held
    finally:  # errors too: what was held is still shown
        out = stream or sys.stderr
        for line in warning_lines(held, redactor):
            print(f"warning: {printable(line)}", file=out)
