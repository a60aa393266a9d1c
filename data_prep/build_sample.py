"""Build the bundled sample corpus from freely licensed text shipped in Debian packages.

    python data_prep/build_sample.py                 # writes data_prep/sample/pile_sample.jsonl.zst
    python data_prep/build_sample.py --out /tmp/s.jsonl.zst --keep-debs /tmp/debs

Needs a Debian 12 (bookworm) machine with `apt-get`, `dpkg-deb`, `groff` and `col` (groff-base,
bsdextrautils). Each package is fetched at a pinned version with `apt-get download` (nothing is
installed) and unpacked with `dpkg-deb -x`; its sha256 goes into `sample/provenance.json`.
The output is Pile-format JSON lines, `{"text": ..., "meta": {"pile_set_name": ..., "origin": ...}}`,
ordered by a hash of the text so every prefix of the file mixes all sets (tests read prefixes).
Licences and what each set holds: data_prep/sample/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "sample" / "pile_sample.jsonl.zst"

PACKAGES = {  # Debian 12 package -> pinned version
    "python3.11-doc": "3.11.2-6+deb12u9",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes": "1:1.99.1-7.3",
    "dict-jargon": "4.4.7-3.1",
    "dict-devil": "1.0-13.1",
    "dict-gcide": "0.48.5+nmu2",
    "base-files": "12.4+deb12u15",
}
# Fortune files left out: topics better not mixed into a model's first diet (ethnic, men-women,
# drugs, politics, love, kids), ASCII art, and near-empty ones.
FORTUNE_FILES = (
    "fortunes literature riddles art computers cookie debian definitions education food goedel humorists "
    "law linux linuxcookie magic medicine miscellaneous news paradoxum people pets platitudes science "
    "songs-poems sports startrek tao wisdom work zippy"
).split()
GCIDE_KEEP_EVERY = 6  # one in six groups of GCIDE entries: ~6.5 MB of its ~40 MB
GROUP_CHARS = 4000  # dictionary entries are packed into documents of about this size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--keep-debs", type=Path, help="download/unpack here instead of a temp folder")
    ap.add_argument("--level", type=int, default=19, help="zstd level")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep_debs or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        provenance = fetch(root)
        trees = {name: root / "x" / name for name in PACKAGES}
        copy_notices(trees, args.out.parent / "copyright")
        docs = [
            *python_docs(trees["python3.11-doc"] / "usr/share/doc/python3.11/html"),
            *man_pages([trees["manpages"], trees["manpages-dev"]]),
            *fortunes([trees["fortunes-min"], trees["fortunes"]]),
            *dictd(trees["dict-jargon"] / "usr/share/dictd/jargon", "JargonFile", group=False),
            *dictd(trees["dict-devil"] / "usr/share/dictd/devil", "DevilsDictionary", group=False),
            *dictd(trees["dict-gcide"] / "usr/share/dictd/gcide", "GCIDE", group=True),
            *licenses(trees["base-files"] / "usr/share/common-licenses"),
        ]
    docs.sort(key=lambda d: hashlib.blake2b(d["text"].encode(), digest_size=8).digest())
    write_zst(args.out, docs, args.level)

    sets: dict[str, dict] = {}
    for d in docs:
        s = sets.setdefault(d["meta"]["pile_set_name"], {"docs": 0, "chars": 0, "bytes": 0})
        s["docs"] += 1
        s["chars"] += len(d["text"])
        s["bytes"] += len(d["text"].encode())
    provenance = {
        "packages": provenance,
        "sets": sets,
        "docs": len(docs),
        "text_bytes": sum(s["bytes"] for s in sets.values()),
        "file": args.out.name,
        "file_bytes": args.out.stat().st_size,
        "file_sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
    }
    prov_path = args.out.with_name("provenance.json")
    prov_path.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    for name, s in sorted(sets.items()):
        print(f"{name:18s} {s['docs']:7d} docs {s['bytes'] / 1e6:7.2f} MB")
    print(
        f"{'total':18s} {len(docs):7d} docs {provenance['text_bytes'] / 1e6:7.2f} MB -> {args.out} "
        f"({provenance['file_bytes'] / 1e6:.2f} MB)"
    )


def fetch(root: Path) -> dict:
    """apt-get download each pinned package into root and unpack it under root/x/<name>."""
    out = {}
    for name, version in PACKAGES.items():
        debs = list(root.glob(f"{name}_*.deb"))
        if not debs:
            pinned = subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=root)
            if pinned.returncode:  # the mirror moved on (a point release): take its version, say so
                print(f"warning: {name}={version} is gone from the mirror; using the current version")
                subprocess.run(["apt-get", "download", name], cwd=root, check=True)
            debs = list(root.glob(f"{name}_*.deb"))
        deb = debs[0]
        version = deb.name.split("_")[1].replace("%3a", ":")
        target = root / "x" / name
        if not target.exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        out[name] = {
            "version": version,
            "deb": deb.name,
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        }
    return out


def copy_notices(trees: dict[str, Path], folder: Path) -> None:
    """Each package's Debian copyright file (its licences and notices) goes beside the corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tree in trees.items():
        notice = tree / "usr/share/doc" / name / "copyright"
        if notice.is_file():
            (folder / f"{name}.txt").write_bytes(notice.read_bytes())


def doc(text: str, pile_set: str, origin: str) -> dict:
    return {"text": text, "meta": {"pile_set_name": pile_set, "origin": origin}}


def tidy(text: str) -> str:
    """Strip trailing spaces, collapse runs of blank lines, trim the ends."""
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- Python documentation (PSF licence): one document per top-level section of each page --------


class _DocsHTML(HTMLParser):
    """Text of Sphinx's `div.body`; a new chunk at each h1/h2 so pages split into sections."""

    BLOCK = {"p", "div", "section", "ul", "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "figure"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.chunks: list[list[str]] = [[]]
        self.depth = 0  # div nesting inside the body; 0 = outside
        self.skip = 0  # inside a headerlink / script / style
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if self.skip or (tag == "a" and "headerlink" in (a.get("class") or "")) or tag in ("script", "style"):
            self.skip += 1
            return
        if tag in ("h1", "h2"):
            self.chunks.append([])
        if tag == "pre":
            self.pre += 1
            self.out("\n\n")
        elif tag in self.BLOCK or tag[0] == "h" and tag[1:].isdigit():
            self.out("\n\n")
        elif tag == "li":
            self.out("\n- ")
        elif tag == "br":
            self.out("\n")
        elif tag in ("td", "th"):
            self.out(" | ")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if self.skip:
            if tag in ("a", "script", "style"):
                self.skip -= 1
            if tag == "div":
                self.depth -= 1
            return
        if tag == "div":
            self.depth -= 1
        if tag == "pre":
            self.pre -= 1
        if tag in self.BLOCK or tag == "pre" or tag[0] == "h" and tag[1:].isdigit():
            self.out("\n\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.out(data if self.pre else re.sub(r"\s+", " ", data))

    def out(self, s):
        self.chunks[-1].append(s)


def python_docs(html_root: Path):
    skip = re.compile(r"^(genindex|py-modindex|search|contents|download|_)")
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if skip.match(rel) or "/_" in rel:
            continue
        parser = _DocsHTML()
        parser.feed(page.read_text(encoding="utf-8"))
        title = ""
        for i, chunk in enumerate(parser.chunks):
            text = tidy(re.sub(r"[ \t]*\n[ \t]*(?=\n)", "\n", "".join(chunk)))
            text = "\n".join(
                line.strip() if not line.startswith("    ") else line for line in text.split("\n")
            )
            text = html.unescape(re.sub(r"\n{3,}", "\n\n", text)).strip()
            if i == 1:
                title = text.split("\n", 1)[0]
            if text and i >= 1:
                body = text if i == 1 or not title else f"{title}\n\n{text}"
                yield doc(body, "PythonDocs", f"python3.11-doc:{rel}#{i}")


# -- Linux man-pages (GPL-2+, BSD and "verbatim" licences per page) -------------------------------


def man_pages(trees: list[Path]):
    env = {"GROFF_NO_SGR": "1", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    for tree in trees:
        for page in sorted((tree / "usr/share/man").glob("man*/*.gz")):
            if page.is_symlink():  # an alias of another page
                continue
            source = gzip.decompress(page.read_bytes())
            if source.lstrip().startswith(b".so "):  # an alias of another page
                continue
            # very long lines, no hyphenation, left-adjusted: paragraphs come out as single lines
            groff = subprocess.run(
                ["groff", "-t", "-man", "-Tutf8", "-rLL=5000n", "-rHY=0", "-dAD=l", "-rcR=1"],
                input=source,
                capture_output=True,
                env=env,
                check=True,
            )
            text = subprocess.run(["col", "-bx"], input=groff.stdout, capture_output=True, check=True).stdout
            lines = text.decode("utf-8", "replace").splitlines()[1:-1]  # drop header and footer
            lines = [line[7:] if line.startswith(" " * 7) else line for line in lines]
            # tables stretch to the 5000-column line: squeeze their padding
            lines = [re.sub(r"( |─|═)\1{3,}", r"\1\1\1", line) if len(line) > 200 else line for line in lines]
            body = tidy("\n".join(lines))
            if body:
                yield doc(body, "ManPages", f"{tree.name}:{page.relative_to(tree).as_posix()}")


# -- fortune cookies (BSD licence, fortune-mod) ----------------------------------------------------


def fortunes(trees: list[Path]):
    for tree in trees:
        folder = tree / "usr/share/games/fortunes"
        for name in FORTUNE_FILES:
            path = folder / name
            if not path.is_file():
                continue
            entries = re.split(r"(?m)^%$", path.read_text(encoding="utf-8", errors="replace"))
            for k, entry in enumerate(entries):
                text = tidy(entry.expandtabs())
                if text:
                    yield doc(text, "Fortunes", f"{tree.name}:{name}#{k}")


# -- dictd dictionaries: Jargon File, Devil's Dictionary (public domain), GCIDE (GPL-3+) ----------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def _unwrap(entry: str) -> str:
    """Join the wrapped lines of each paragraph; keep the headword line and paragraph breaks."""
    paragraphs = re.split(r"\n\s*\n", entry.strip("\n"))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def dictd(base: Path, pile_set: str, group: bool):
    data = gzip.decompress(base.with_suffix(".dict.dz").read_bytes())
    spans = set()
    for line in base.with_suffix(".index").read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")[:3]
        if not word.startswith("00-database") and not word.startswith("00database"):
            spans.add((_b64(off), _b64(length)))
    entries = [_unwrap(data[o : o + n].decode("utf-8", "replace")) for o, n in sorted(spans)]
    if not group:
        for k, e in enumerate(entries):
            yield doc(e, pile_set, f"{base.name}#{k}")
        return
    batch, size, g = [], 0, 0
    for e in entries:
        batch.append(e)
        size += len(e)
        if size >= GROUP_CHARS:
            if g % GCIDE_KEEP_EVERY == 0:
                yield doc("\n\n".join(batch), pile_set, f"{base.name}#group{g}")
            batch, size, g = [], 0, g + 1


# -- licence texts (base-files: /usr/share/common-licenses; verbatim copying permitted) -----------


def licenses(folder: Path):
    for path in sorted(folder.iterdir()):
        if path.is_file():  # symlinks (GPL -> GPL-3) read as the same text: a natural duplicate
            yield doc(tidy(path.read_text(encoding="utf-8")), "Licenses", f"base-files:{path.name}")


def write_zst(path: Path, docs: list[dict], level: int) -> None:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    tmp.write_bytes(zstandard.ZstdCompressor(level=level, threads=-1).compress(raw))
    tmp.replace(path)


if __name__ == "__main__":
    main()
