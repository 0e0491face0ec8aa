"""Text the KME writes for people (log lines, events): never able to forge a line."""


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped, so it cannot forge a log line or event.

    File names that are not valid UTF-8 arrive with surrogate escapes
    (os.fsdecode); their bytes are shown as \\xNN.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xdc00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)
