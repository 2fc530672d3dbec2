"""Real English text for the accuracy evaluation: Jane Austen's six novels, as Debian's r-cran-janeaustenr
package ships them (one R character vector of lines per novel, in an R lazy-load database).

Split (docs/ACCURACY.md): calibration text from "Sense and Sensibility" (head priorities for the 2/4-bit
mix), held-out text for perplexity from "Persuasion" and "Emma", haystack text for the passkey test from
"Northanger Abbey". Nothing here reads the network: the package's files are found where dpkg put them,
under TURBOATTN_DATA, or in ~/.cache/turboattn; `ensure_austen()` fetches the .deb with `apt-get download`
(no R needed) when none is there.
"""
import os
import random
import shutil
import struct
import subprocess
import tempfile
import zlib

PACKAGE = "r-cran-janeaustenr"
_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
TITLES = {  # first line of each novel -> short name
    "SENSE AND SENSIBILITY": "sense_and_sensibility", "PRIDE AND PREJUDICE": "pride_and_prejudice",
    "MANSFIELD PARK": "mansfield_park", "EMMA": "emma", "NORTHANGER ABBEY": "northanger_abbey",
    "PERSUASION": "persuasion",
}
CALIBRATION = ("sense_and_sensibility",)
HELD_OUT = ("persuasion", "emma")
HAYSTACK = ("northanger_abbey",)


def _cache_dir():
    return os.environ.get("TURBOATTN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "turboattn")


def _candidates():
    yield os.path.join("/", _RDB)
    yield os.path.join(_cache_dir(), PACKAGE, _RDB)


def ensure_austen():
    """Path of the novels' R database; downloads and unpacks the Debian package into the cache if needed."""
    for path in _candidates():
        if os.path.exists(path):
            return path
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise FileNotFoundError(f"the Jane Austen corpus ({PACKAGE}) is not installed and this system has no "
                                f"apt-get/dpkg-deb to fetch it: install the Debian package {PACKAGE} or unpack it "
                                f"under {_cache_dir()}/{PACKAGE}")
    target = os.path.join(_cache_dir(), PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        if r.returncode != 0 or not debs:
            raise FileNotFoundError(f"apt-get download {PACKAGE} failed ({r.returncode}): {r.stderr.strip()[-300:]} "
                                    "(run apt-get update first?)")
        os.makedirs(target, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), target], check=True)
    return os.path.join(target, _RDB)


def _read_r_strings(blob):
    """A serialized R character vector (XDR format, version 2 or 3) -> list of str (NA -> "")."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR-serialized R object")
    pos = 2
    version = struct.unpack_from(">i", blob, pos)[0]
    pos += 12  # version, writer's R version, minimal reader version
    if version == 3:
        n = struct.unpack_from(">i", blob, pos)[0]
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"R object of type {flags & 0xFF}, expected a character vector (16)")
    out = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", blob, pos)  # CHARSXP flags, byte length (-1: NA)
        pos += 8
        if n < 0:
            out.append("")
            continue
        out.append(blob[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def austen_novels(path=None):
    """{short name: text} of the six novels: each paragraph's lines joined by spaces (the package keeps the
    printed line breaks), paragraphs separated by blank lines."""
    data = open(path or ensure_austen(), "rb").read()
    novels, pos = {}, 0
    while pos < len(data):  # records: 4-byte big-endian raw length, then one zlib stream
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4:])
        pos = len(data) - len(d.unused_data)
        lines = _read_r_strings(raw)
        title = next((l.strip() for l in lines if l.strip()), "")
        name = TITLES.get(title.upper())
        if name is None or name in novels:
            raise ValueError(f"unexpected novel in {PACKAGE}: first line {title!r}"
                             f"{' (twice)' if name else ''}")
        paragraphs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        novels[name] = "\n\n".join(paragraphs)
    if set(novels) != set(TITLES.values()):
        raise ValueError(f"{PACKAGE}: found {sorted(novels)}, expected the six novels")
    return novels


def text_of(names, novels=None):
    novels = novels or austen_novels()
    return "\n\n".join(novels[n] for n in names)


def token_windows(ids, length, count, *, skip=0):
    """`count` non-overlapping windows of `length` tokens from a 1-D list of ids, evenly spaced after `skip`."""
    usable = len(ids) - skip
    if usable < length * count:
        raise ValueError(f"held-out text has {usable} tokens, fewer than {count} windows of {length}")
    stride = usable // count
    return [ids[skip + i * stride: skip + i * stride + length] for i in range(count)]


PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, haystack_ids, context_tokens, depth, key):
    """(context ids, question ids): the intro, haystack text cut to make `context_tokens` in all with the
    needle placed at fraction `depth` of the haystack, and the question that follows it."""
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)["input_ids"]
    intro = tokenizer(PASSKEY_INTRO, add_special_tokens=False)["input_ids"]
    question = tokenizer(PASSKEY_QUESTION, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    fill = context_tokens - len(bos) - len(intro) - len(needle) - len(question)
    if fill <= 0 or fill > len(haystack_ids):
        raise ValueError(f"passkey: {context_tokens} tokens leave {fill} for the haystack "
                         f"({len(haystack_ids)} available)")
    at = int(round(depth * fill))
    hay = haystack_ids[:fill]
    return bos + intro + hay[:at] + needle + hay[at:], question


def passkeys(count, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(10000, 100000) for _ in range(count)]
