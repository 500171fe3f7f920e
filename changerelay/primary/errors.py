"""The errors a MongoDB server answers with: ``{ok: 0, code, codeName, errmsg}``."""

from __future__ import annotations

from collections.abc import Iterable

CODE_NAMES = {
    1: "InternalError", 2: "BadValue", 4: "NoSuchKey", 6: "HostUnreachable", 7: "HostNotFound",
    9: "FailedToParse", 11: "UserNotFound", 13: "Unauthorized", 14: "TypeMismatch",
    18: "AuthenticationFailed", 20: "IllegalOperation", 26: "NamespaceNotFound",
    40: "ConflictingUpdateOperators", 43: "CursorNotFound", 47: "NoMatchingDocument",
    48: "NamespaceExists", 50: "MaxTimeMSExpired", 59: "CommandNotFound", 66: "ImmutableField",
    72: "InvalidOptions", 73: "InvalidNamespace", 89: "NetworkTimeout", 91: "ShutdownInProgress",
    136: "CappedPositionLost", 189: "PrimarySteppedDown", 237: "CursorKilled",
    239: "SnapshotTooOld",
    251: "NoSuchTransaction", 260: "InvalidResumeToken", 262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError", 286: "ChangeStreamHistoryLost",
    352: "UnsupportedOpQueryCommand", 10107: "NotWritablePrimary", 11000: "DuplicateKey",
    11600: "InterruptedAtShutdown", 11601: "Interrupted", 11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk", 13436: "NotPrimaryOrSecondary",
}
NON_RESUMABLE = ("NonResumableChangeStreamError",)
HISTORY_LOST_MSG = ("Resume of change stream was not possible, as the resume point may no longer "
                    "be in the oplog.")


class CommandError(Exception):
    """A command failure, sent to the client as ``{ok: 0, code, codeName, errmsg}``."""

    def __init__(self, code: int, errmsg: str, labels: Iterable[str] = ()):
        super().__init__(f"{errmsg} (code {code})")
        self.code = code
        self.errmsg = errmsg
        self.labels = tuple(labels)

    def reply(self) -> dict:
        doc = {"ok": 0.0, "errmsg": self.errmsg, "code": self.code,
               "codeName": CODE_NAMES.get(self.code, f"Location{self.code}")}
        if self.labels:
            doc["errorLabels"] = list(self.labels)
        return doc


def not_implemented(what: str) -> CommandError:
    return CommandError(2, f"TestPrimary does not implement {what}; extend changerelay/primary/ "
                           "or test this against a real replica set (MONGODB_TEST_URI)")
