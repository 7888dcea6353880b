"""Where the speech comes from: Common Voice releases (folder or tarball), the Mozilla Data
Collective (downloaded with the `datacollective` package), and any Hugging Face dataset.

Every reader yields plain `Row`s; audio is decoded later, in `whisper_ft.features`. This is
the one module that reaches the network for data; models come through `whisper_ft.model`
(loading) and `whisper_ft.hub` (publishing, and the Space's download), and the app's requests
through `whisper_ft.youtube` and `whisper_ft.translate`.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tarfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from whisper_ft.claims import ClaimSet, read_holder
from whisper_ft.config import SourceConfig
from whisper_ft.errors import UserError, chain
from whisper_ft.files import write_atomic
from whisper_ft.model import hub_offline

TRAIN, VALIDATION, EVAL = "train", "validation", "eval"  # eval: the test split
DONE_MARK = ".extracted"


class SourceError(UserError, ValueError):
    """A source that cannot be read; the message says what to do."""


@dataclass(frozen=True)
class Row:
    """One utterance before decoding. `audio` is a file path, the encoded bytes, or where to read them."""

    source: str
    split: str
    id: str
    audio: str | bytes | ArrowAudio
    sentence: str
    speaker: str = ""
    meta: dict = field(default_factory=dict)


def read_source(src: SourceConfig, data_dir: Path, stale_seconds: float = 300.0) -> dict[str, list[Row]]:
    """All rows of one source, as {"train": [...], "validation": [...], "eval": [...]} in a
    stable order; validation is carved out of training when the source names no split for it.
    `stale_seconds`: when a claim on unpacking a tarball counts as abandoned (`extract_tarball`)."""
    if src.kind == "hf":
        rows = _read_hf(src)
    else:
        root = download_mdc(src.dataset_id, data_dir / "raw") if src.kind == "mdc" else Path(src.path).expanduser()
        rows = _read_common_voice(src, locate_release(root, data_dir / "raw", stale_seconds))
    if not src.validation_splits and src.validation_from:
        rows[TRAIN], rows[VALIDATION] = carve_validation(rows[TRAIN], src.validation_from, src.validation_fraction,
                                                         src.validation_max_clips, seed=src.name)
    return rows


def carve_validation(train: list[Row], from_split: str, fraction: float, max_clips: int,
                     seed: str = "") -> tuple[list[Row], list[Row]]:
    """Move whole speakers from the training rows of source split `from_split` ("all": any) to
    validation until it holds about `fraction` of that split's rows (at most `max_clips`):
    speakers in a seeded hash order, skipping those that would land further from the target
    than stopping (a prolific speaker never swamps it), and at least the smallest speaker.

    Taking whole speakers keeps validation speaker-disjoint from training wherever the source's
    own splits are (Common Voice's are). Rows without a speaker count as speakers of their own.
    The choice depends only on the rows and `seed`, so reruns pick the same speakers.
    """
    pool = [r for r in train if from_split == "all" or r.id.split("/", 1)[0] == from_split]
    target = min(max_clips, round(fraction * len(pool)))
    if target <= 0:
        return train, []
    by_speaker: dict[str, list[Row]] = {}
    for r in pool:
        by_speaker.setdefault(r.speaker or f"row:{r.id}", []).append(r)
    order = sorted(by_speaker, key=lambda s: hashlib.sha256(f"{seed}|{s}".encode()).hexdigest())
    chosen: set[str] = set()
    taken = 0
    for speaker in order:
        if taken >= target:
            break
        n = len(by_speaker[speaker])
        if taken + n > max_clips or taken + n - target > target - taken:
            continue  # over the cap, or further from the target than stopping here: try smaller speakers
        chosen.add(speaker)
        taken += n
    if not chosen:  # every speaker overshoots the target (a small split): the smallest one within the cap
        fits = [s for s in order if len(by_speaker[s]) <= max_clips]
        chosen = {min(fits, key=lambda s: len(by_speaker[s]))} if fits else set()
    picked = {r.id for s in chosen for r in by_speaker[s]}
    validation = [replace(r, split=VALIDATION) for r in pool if r.id in picked]
    return [r for r in train if r.id not in picked], validation


# --------------------------------------------------------------------------- Common Voice


CV_METADATA = ("gender", "age", "accents", "variant")


def locate_release(path: Path, extract_dir: Path, stale_seconds: float = 300.0) -> Path:
    """The folder holding train.tsv/test.tsv and clips/, given it, a parent of it, or a .tar.gz."""
    if not path.exists():
        raise SourceError(f"no such file or folder: {path}")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise SourceError(f"{path} is neither a Common Voice folder nor a .tar.gz release")
        path = extract_tarball(path, extract_dir, stale_seconds)
    hits = sorted({p.parent for pattern in ("test.tsv", "*/test.tsv", "*/*/test.tsv") for p in path.glob(pattern)})
    if not hits:
        raise SourceError(f"no Common Voice test.tsv under {path}: expected a cv-corpus-*/<locale> folder")
    if len(hits) > 1:
        names = [str(h.relative_to(path)) for h in hits]
        raise SourceError(f"several Common Voice folders under {path} ({', '.join(names)}): point at one of them")
    return hits[0]


def archive_stem(archive: Path) -> str:
    """The archive's file name without .tar, .tar.gz or .tgz."""
    return archive.name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")


def unpack_folder_name(archive: Path) -> str:
    """The folder under extract_dir that `archive` unpacks into: its name without the tar
    suffixes and a short hash of its resolved path, so that two archives of one name in
    different folders (/a/sv.tar.gz, /b/sv.tar.gz) never unpack over each other."""
    return f"{archive_stem(archive)}-{hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:8]}"


def extract_tarball(archive: Path, extract_dir: Path, stale_seconds: float = 300.0, poll: float = 1.0) -> Path:
    """Unpack a release once into extract_dir/<archive name>-<hash of its path>
    (`unpack_folder_name`); a marker file records completion and which archive it was (its
    size and modification time), so that a newer download at the same path is unpacked again
    instead of the old files being read. That removes the old files: replace a tarball while
    no process reads its release (a feature store begun on the old one then refuses the new
    one, as its plan lists every clip and sentence).

    Processes started together on one tarball (`feature_pipeline.py --num-shards N`) unpack it
    once: the first claims the work (`whisper_ft.claims`), the others wait for its marker, and
    a claim whose holder died goes stale after `stale_seconds` and is taken over.
    """
    name = unpack_folder_name(archive)
    dest = extract_dir / name
    state = unpacked_state(dest, archive)
    if state == "done":
        return dest
    extract_dir.mkdir(parents=True, exist_ok=True)
    claim = extract_dir / f".{name}.claim"
    with ClaimSet(stale_seconds, "features.claim_stale_seconds") as claims:
        announced = False
        while not claims.take(claim):
            if unpacked_state(dest, archive) == "done":
                return dest
            if not announced:
                holder = read_holder(claim)
                print(f"waiting for {holder.who if holder else 'another process'} to unpack {archive}",
                      file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll)
        state = unpacked_state(dest, archive)
        if state == "done":  # unpacked while this process waited
            return dest
        if adopt_earlier_unpack(archive, extract_dir, dest):
            return dest
        tmp = extract_dir / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process that died unpacking
        tmp.mkdir()
        why = f"{archive} has changed since it was unpacked; unpacking it again" if state == "changed" else \
            f"extracting {archive} -> {dest} (once)"
        print(why, file=sys.stderr, flush=True)
        try:
            # the identity of the file this process opens: a download renamed into place
            # meanwhile is another file, and is unpacked by the next run
            with open(archive, "rb") as f, tarfile.open(fileobj=f) as tar:
                identity = archive_identity(archive, os.fstat(f.fileno()))
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            unreadable = isinstance(e, (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error))
            hint = "incomplete download? delete it and fetch again" if unreadable else f"writing to {extract_dir}"
            # tarfile's "could not be opened" lists each compression it tried, one line each
            reason = "not a tar archive, plain or compressed" if "\n" in str(e) else e
            raise SourceError(f"cannot unpack {archive}: {reason} ({hint})") from e
        claims.confirm(claim)
        (tmp / DONE_MARK).write_text(json.dumps(identity))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def adopt_earlier_unpack(archive: Path, extract_dir: Path, dest: Path) -> bool:
    """Move a complete unpack of this very archive from extract_dir/<archive name> (where
    releases were unpacked before the folder name carried the path's hash) to `dest`, rather
    than unpacking tens of gigabytes again beside it. True when it did."""
    old = extract_dir / archive_stem(archive)
    try:
        recorded = json.loads((old / DONE_MARK).read_text())
    except (OSError, ValueError):
        return False
    now = archive_identity(archive)
    if not isinstance(recorded, dict) or any(recorded.get(k) != now[k] for k in ("archive", "size", "mtime_ns")):
        return False
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(old, dest)
    return True


def archive_identity(archive: Path, st: os.stat_result | None = None) -> dict:
    """What the unpacking marker records of the archive: its path, size and modification time
    (from `st` when given: the status of the file as opened)."""
    st = st or archive.stat()
    return {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def unpacked_state(dest: Path, archive: Path) -> str:
    """"done" when `dest` holds a complete unpack of `archive` as it is now (the same size and
    modification time), "changed" when it holds one of an earlier file at that path, "missing"
    when there is none. A marker written before it recorded size and time holds the path only
    and is taken as done."""
    try:
        text = (dest / DONE_MARK).read_text()
    except FileNotFoundError:
        return "missing"
    try:
        recorded = json.loads(text)
    except ValueError:
        return "done"
    if not isinstance(recorded, dict):
        return "done"
    now = archive_identity(archive)
    return "done" if all(recorded.get(k) == now[k] for k in ("size", "mtime_ns")) else "changed"


CV_COLUMNS = ("path", "sentence")  # what every Common Voice TSV has; client_id (the speaker) since release 1 too


def read_cv_tsv(path: Path, limit: int = 0) -> list[dict[str, str]]:
    """The first `limit` (0: all) rows of a Common Voice TSV, read as they are needed; quoting
    is off because sentences contain quote marks, and a byte-order mark (a file re-saved by an
    editor) is skipped. A row with more fields than the header (a tab in a sentence of an edited
    file) is refused with its line: its sentence would be cut there and its later fields shifted
    into the wrong columns. So is a row that ends inside its sentence (a line break in the
    sentence: csv ends the row there and reads the rest as a row of its own), and a clip listed
    twice (its one id would stand for two rows, with two sentences). A row short of fields after
    its sentence (trailing tabs stripped by an editor) has them empty."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, [])
            missing = [c for c in CV_COLUMNS if c not in header]
            if missing:
                raise SourceError(f"{path} has no {' or '.join(missing)} column: not a Common Voice TSV "
                                  f"(header: {' '.join(header) or 'empty'})")
            needed = min(header.index("sentence") + 2, len(header))  # the sentence, ended by a tab unless last
            rows: list[dict[str, str]] = []
            first: dict[str, int] = {}
            for values in reader:
                if not values:  # a blank line
                    continue
                line = reader.line_num
                if len(values) > len(header):
                    raise SourceError(f"{path} line {line} has more tab-separated fields than its header's "
                                      f"{len(header)}: a tab in a sentence? Replace it by a space")
                if len(values) < needed:
                    raise SourceError(f"{path} line {line} ends inside its sentence: a line break in the sentence? "
                                      "Join it onto one line")
                row = dict(zip(header, values + [""] * (len(header) - len(values))))
                if row["path"] and (seen := first.setdefault(row["path"], line)) != line:
                    raise SourceError(f"{path} lists the clip {row['path']} twice (lines {seen} and {line}): "
                                      "one row per clip, as in a release; delete one of them")
                rows.append(row)
                if len(rows) == limit:
                    break
            return rows
    except (UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read it as UTF-8 tab-separated text ({e})") from e


def _targets(src: SourceConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(store split, source splits) pairs of a source."""
    return (TRAIN, src.train_splits), (VALIDATION, src.validation_splits), (EVAL, src.eval_splits)


def _read_common_voice(src: SourceConfig, release: Path) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {TRAIN: [], VALIDATION: [], EVAL: []}
    for target, splits in _targets(src):
        for split in splits:
            tsv = release / f"{split}.tsv"
            if not tsv.is_file():
                raise SourceError(f"source {src.name}: no {split}.tsv in {release}")
            for r in read_cv_tsv(tsv, src.limit):
                clip = r.get("path") or ""
                meta = {k: r[k] for k in CV_METADATA if r.get(k)} | {"locale": r.get("locale") or release.name}
                out[target].append(Row(src.name, target, f"{split}/{clip}", str(release / "clips" / clip),
                                       r.get("sentence") or "", r.get("client_id") or "", meta))
    return out


def _mdc_record(dataset_id: str, download_dir: Path) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_id)
    return download_dir / f".mdc-{safe}-{hashlib.sha1(dataset_id.encode()).hexdigest()[:8]}.json"


def download_mdc(dataset_id: str, download_dir: Path) -> Path:
    """Download (or resume) a Mozilla Data Collective release tarball; returns its path. Once
    complete, it is recorded (file name and size) and later runs take it without the server or
    the key: a release's tarball does not change, and a rerun offline goes on."""
    record = _mdc_record(dataset_id, download_dir)
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
        archive = download_dir / done["archive"]
        if archive.is_file() and archive.stat().st_size == done["size"]:
            return archive
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not os.environ.get("MDC_API_KEY"):
        raise SourceError("source kind mdc needs MDC_API_KEY: create a key at "
                          "https://datacollective.mozillafoundation.org (profile > API keys) and export it")
    try:
        import datacollective
        from datacollective.errors import DownloadError
    except ImportError as e:
        raise SourceError("source kind mdc needs the datacollective package: pip install datacollective") from e
    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        archive = Path(datacollective.download_dataset(dataset_id, download_directory=str(download_dir)))
    except (FileNotFoundError, PermissionError) as e:
        raise SourceError(f"Mozilla Data Collective refused dataset {dataset_id!r}: {e} "
                          "(accept its terms on the website first)") from e
    except (OSError, RuntimeError, DownloadError) as e:  # network, auth, rate limit, cut off
        raise SourceError(f"cannot download {dataset_id!r} from the Mozilla Data Collective: "
                          f"{str(e) or type(e).__name__}; rerun to resume") from e
    if archive.parent.resolve() == download_dir.resolve() and archive.is_file():
        write_atomic(record, json.dumps({"dataset_id": dataset_id, "archive": archive.name,
                                         "size": archive.stat().st_size}))
    return archive


# --------------------------------------------------------------------------- Hugging Face


def _read_hf(src: SourceConfig) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {TRAIN: [], VALIDATION: [], EVAL: []}
    for target, splits in _targets(src):
        for split in splits:
            columns, examples = _open_hf_split(src, split)
            for col in (src.audio_column, src.text_column):
                if col not in columns:
                    raise SourceError(f"source {src.name}: split {split} has no column {col!r} "
                                      f"(columns: {', '.join(map(str, columns))})")
            has_speaker = src.speaker_column in columns
            audio = _audio_refs(examples, src.audio_column)
            if audio is None:
                audio = (_audio_value(ex[src.audio_column]) for ex in examples)
            texts = _text_columns(examples, [c for c in (src.text_column, src.speaker_column) if c in columns])
            for i, (data, ex) in enumerate(itertools.islice(zip(audio, texts), src.limit or None)):
                speaker = _sentence(ex.get(src.speaker_column)) if has_speaker else ""  # speaker 0 too
                # a record without the text (audiofolder JSON lines may omit keys) has an empty
                # sentence, which the encoder drops and counts
                out[target].append(Row(src.name, target, f"{split}/{i}", data, _sentence(ex.get(src.text_column)),
                                       speaker))
    return out


@dataclass(frozen=True)
class ArrowAudio:
    """The encoded audio of row `index` in an Arrow-backed dataset, read when it is decoded, so
    that a dataset with embedded audio never has to fit in memory."""

    files: tuple[str, ...]
    column: str
    index: int

    def read(self) -> str | bytes:
        return _audio_value(_arrow_table(self.files).column(self.column)[self.index].as_py())


@functools.lru_cache(maxsize=4)
def _arrow_table(files: tuple[str, ...]):
    import pyarrow as pa

    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in files])  # zero-copy


def _audio_value(audio) -> str | bytes:
    audio = audio or {}
    return audio if isinstance(audio, str) else audio.get("bytes") or audio.get("path") or ""


def _audio_refs(ds, column: str) -> list[ArrowAudio] | None:
    """References into a memory-mapped dataset's files, or None where they would not line up."""
    files = tuple(f["filename"] for f in getattr(ds, "cache_files", None) or ())
    if not files or getattr(ds, "_indices", None) is not None or len(_arrow_table(files)) != len(ds):
        return None
    return [ArrowAudio(files, column, i) for i in range(len(ds))]


def _text_columns(examples, columns: list[str]) -> Iterable[dict]:
    """The examples' text columns only (a datasets.Dataset skips reading its audio)."""
    return examples.select_columns(columns) if hasattr(examples, "select_columns") else examples


def _open_hf_split(src: SourceConfig, split: str) -> tuple[list[str], Iterable[dict]]:
    """(column names, examples) of one split; audio stays encoded (a path or bytes), never decoded."""
    path = Path(src.path).expanduser()
    if path.is_dir() and _audiofolder_metadata(path):
        return _read_audiofolder_split(src, path, split)
    ds = _load_hf_split(src, split)
    return ds.column_names, ds


AUDIOFOLDER_METADATA = ("metadata.csv", "metadata.jsonl")


def _audiofolder_metadata(folder: Path) -> list[Path]:
    return [p for name in AUDIOFOLDER_METADATA for p in (folder / name, *folder.glob(f"*/{name}")) if p.is_file()]


def _read_audiofolder_split(src: SourceConfig, root: Path, split: str) -> tuple[list[str], list[dict]]:
    """A local audiofolder split: `<root>/<split>/metadata.csv|jsonl`, or `<root>/metadata.*` as train.

    Read here because datasets' audiofolder loader encodes every clip with torchcodec, which
    the pipeline must not need. `file_name` becomes the `audio` column, as in datasets.
    """
    folder = root / split if (root / split).is_dir() else root if split == "train" else None
    meta = next((folder / n for n in AUDIOFOLDER_METADATA if folder and (folder / n).is_file()), None)
    if meta is None:
        raise SourceError(f"source {src.name}: audiofolder {root} has no split {split!r} "
                          f"(expected {root}/{split}/metadata.csv or metadata.jsonl)")
    try:
        text = meta.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:
        raise SourceError(f"source {src.name}: {meta} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                          "UTF-8") from e
    if meta.suffix == ".csv":
        records = _read_metadata_csv(src, meta, text)
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError as e:
                raise SourceError(f"source {src.name}: {meta} line {n} is not JSON ({e})") from e
            if record is not None and not isinstance(record, dict):
                raise SourceError(f"source {src.name}: {meta} line {n} is not a JSON object")
            records += [record] if record is not None else []
    missing = next((i for i, r in enumerate(records) if r.get("file_name") in (None, "")), None)
    if missing is not None:
        raise SourceError(f"source {src.name}: {meta} has no file_name for record {missing + 1}")
    columns = ["audio"] + [c for c in dict.fromkeys(k for r in records for k in r) if c != "file_name"]  # any record's
    examples = [{**{k: v for k, v in r.items() if k != "file_name"}, "audio": str(folder / str(r["file_name"]))}
                for r in records]
    return columns, examples


def _read_metadata_csv(src: SourceConfig, meta: Path, text: str) -> list[dict]:
    """The records of an audiofolder metadata.csv (`text`). A row with more or fewer fields
    than the header is refused with its line, as datasets' audiofolder refuses it: csv would
    cut a sentence at an unquoted comma (the rest going to a column without a name), or fill
    the missing fields with None."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    for r in reader:
        where = f"source {src.name}: {meta} line {reader.line_num}"
        if None in r:
            raise SourceError(f"{where} has more fields than its header's {len(reader.fieldnames)}: put a field "
                              'that holds a comma in double quotes ("Ja, tack.")')
        if None in r.values():
            raise SourceError(f"{where} has fewer fields than its header's {len(reader.fieldnames)}: add the "
                              "missing ones (empty, if need be)")
        records.append(r)
    return records


def _sentence(value) -> str:
    """A transcript as text: a number (a JSON line's `"sentence": 1984`) as written, a missing
    or null one empty (the encoder drops and counts it)."""
    return "" if value is None else str(value)


def _load_hf_split(src: SourceConfig, split: str):
    """A split with its audio column left encoded (decode=False), so torchcodec is never needed."""
    import datasets

    path = Path(src.path).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
                raise KeyError(f"no split {split!r} (has {', '.join(loaded)})")
            asked = {*src.train_splits, *src.validation_splits, *src.eval_splits}
            if not isinstance(loaded, datasets.DatasetDict) and len(asked) > 1:
                # one Dataset would be every split at once: training on the test clips
                raise KeyError(f"it is one Dataset, without splits, but the source asks for {len(asked)} "
                               f"({', '.join(sorted(asked))}): save a DatasetDict with them, or name one split "
                               "per source")
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else src.path, src.hf_config or None, split=split)
    except (FileNotFoundError, KeyError, ValueError, ConnectionError, OSError, ImportError,
            datasets.exceptions.DatasetGenerationError) as e:
        if any("torchcodec" in str(c) for c in chain(e)):  # datasets' audiofolder reader encodes every clip with it
            raise SourceError(f"source {src.name}: cannot load split {split!r} of {src.path} without torchcodec: a "
                              f"local audiofolder is read with {path}/{split}/metadata.csv or metadata.jsonl (a "
                              "file_name and a text column)") from e
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise SourceError(f"source {src.name}: cannot load split {split!r} of {src.path}: "
                          f"{text.splitlines()[0] if text else type(e).__name__}{_not_found_hint(src.path)}") from e
    if src.audio_column in ds.column_names:
        ds = ds.cast_column(src.audio_column, datasets.Audio(decode=False))
    return ds


def _not_found_hint(name: str) -> str:
    """What an `hf` source's path that loaded nothing may be: a local folder that is not there
    (a path, or a name no Hub id looks like), or a Hub id this machine cannot fetch."""
    if Path(name).expanduser().exists():
        return ""
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return " (no such folder)"
    if hub_offline():
        return (" (HF_HUB_OFFLINE is set: a Hub id loads only from the cache of an earlier download; or pass a local "
                "folder)")
    return " (offline? pass a local folder, or set HF_HUB_OFFLINE=1 with a cached copy)"


def describe(src: SourceConfig) -> dict:
    """What the manifest records about a source."""
    where = src.dataset_id if src.kind == "mdc" else src.path
    validation = ({"splits": list(src.validation_splits)} if src.validation_splits else
                  {"carved_from": src.validation_from, "fraction": src.validation_fraction,
                   "max_clips": src.validation_max_clips} if src.validation_from else {})
    return {"name": src.name, "kind": src.kind, "where": where, "train_splits": list(src.train_splits),
            "eval_splits": list(src.eval_splits), "validation": validation, "limit": src.limit}
