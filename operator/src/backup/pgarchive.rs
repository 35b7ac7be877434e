//! A structural check of a PostgreSQL custom-format archive (`pg_dump --format=custom`) while it streams past,
//! in the backup's own thread: header, table of contents, then every data block, whose chunks are skipped by
//! their lengths without being looked at. The archive passes only when it ends exactly after a block and every
//! table of contents entry with data had its block, once. So a dump cut anywhere (inside the header, the table
//! of contents, a block, or between blocks) fails, as do unknown or repeated blocks.
//!
//! This replaces piping every byte through `pg_restore --file=/dev/null` (a second process that formats all
//! rows as SQL, about 10 % of a backup's CPU). Layouts are those of pg_dump's `WriteHead`/`WriteToc`/
//! `WriteDataChunks` for archive versions 1.12 to 1.16 (PostgreSQL 9.6 to 17). For any other version the
//! caller falls back to `pg_restore` ([`Feed::Unsupported`]).
//!
//! Integers are a sign byte and `intSize` little-endian magnitude bytes; strings are an integer length (-1 for
//! NULL) and the bytes; offsets are a flag byte and `offSize` bytes.

/// Archive versions parsed here (major, minor).
const MIN_VERSION: (u8, u8) = (1, 12);
const MAX_VERSION: (u8, u8) = (1, 16);
/// `archCustom` in the header's format byte.
const FORMAT_CUSTOM: u8 = 1;
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// Largest header or table of contents entry held while waiting for the rest of it.
const MAX_UNIT: usize = 256 << 20;

/// The result of feeding bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Keep feeding.
    Continue,
    /// The archive has a version this check does not know; these are all the bytes fed so far, for a
    /// fallback check that must see the archive from its start. Later bytes are ignored here.
    Unsupported { version: String, prefix: Vec<u8> },
}

/// What a passed check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub version: String,
    pub toc_entries: u64,
    pub data_blocks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Layout {
    minor: u8,
    int_size: usize,
    off_size: usize,
}

#[derive(Debug)]
enum State {
    Header,
    TocCount,
    Toc {
        left: u64,
    },
    /// Between blocks: a block type byte or the end of the archive.
    Block,
    BlockId {
        blobs: bool,
    },
    /// A chunk length (0 ends the data of a table or of one large object).
    ChunkLen {
        id: i64,
        blob: bool,
    },
    Chunk {
        id: i64,
        blob: bool,
        left: u64,
    },
    /// The next large object's OID (0 ends the BLOBS block).
    BlobOid {
        id: i64,
    },
    Failed,
    Handed,
}

/// Incremental checker: [`PgArchiveCheck::feed`] every byte in order, then [`PgArchiveCheck::finish`].
#[derive(Debug)]
pub struct PgArchiveCheck {
    state: State,
    layout: Option<Layout>,
    version: String,
    /// Bytes of a header, table of contents entry or integer that continues in the next feed.
    pending: Vec<u8>,
    /// Every byte fed while still in the header (for a fallback).
    prefix: Vec<u8>,
    toc_entries: u64,
    /// Entries with data: dump id -> description for messages.
    with_data: std::collections::BTreeMap<i64, String>,
    seen: std::collections::BTreeSet<i64>,
    bytes: u64,
    error: Option<String>,
}

impl Default for PgArchiveCheck {
    fn default() -> Self {
        Self::new()
    }
}

/// Not enough bytes yet for the unit being parsed.
struct More;

/// A cursor over the bytes of one unit.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], More> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or(More)?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, More> {
        Ok(self.take(1)?[0])
    }
    fn int(&mut self, l: Layout) -> Result<i64, More> {
        let sign = self.byte()?;
        let mut v: i64 = 0;
        for (i, b) in self.take(l.int_size)?.iter().enumerate() {
            v |= i64::from(*b) << (8 * i);
        }
        Ok(if sign != 0 { -v } else { v })
    }
    /// A string's bytes (`None` for NULL); a negative length other than -1 is reported by the caller as damage.
    fn string(&mut self, l: Layout) -> Result<Result<Option<&[u8]>, i64>, More> {
        match self.int(l)? {
            -1 => Ok(Ok(None)),
            n if n < 0 => Ok(Err(n)),
            n => Ok(Ok(Some(self.take(usize::try_from(n).map_err(|_| More)?)?))),
        }
    }
}

/// A parsed unit, or why the archive is damaged.
type Unit<T> = Result<Result<T, String>, More>;

impl PgArchiveCheck {
    pub fn new() -> Self {
        PgArchiveCheck {
            state: State::Header,
            layout: None,
            version: String::new(),
            pending: Vec::new(),
            prefix: Vec::new(),
            toc_entries: 0,
            with_data: Default::default(),
            seen: Default::default(),
            bytes: 0,
            error: None,
        }
    }

    /// Feeds the next bytes of the archive.
    pub fn feed(&mut self, data: &[u8]) -> Feed {
        if matches!(self.state, State::Failed | State::Handed) {
            return Feed::Continue;
        }
        if matches!(self.state, State::Header) {
            self.prefix.extend_from_slice(data);
        }
        if self.pending.is_empty() {
            let used = self.run(data);
            if used < data.len() && !matches!(self.state, State::Failed | State::Handed) {
                self.pending.extend_from_slice(&data[used..]);
            }
        } else {
            self.pending.extend_from_slice(data);
            let buf = std::mem::take(&mut self.pending);
            let used = self.run(&buf);
            if !matches!(self.state, State::Failed | State::Handed) {
                self.pending = buf[used..].to_vec();
            }
        }
        if !matches!(self.state, State::Header | State::Handed) && !self.prefix.is_empty() {
            self.prefix = Vec::new();
        }
        if self.pending.len() > MAX_UNIT {
            self.fail(format!("a header or table of contents entry is larger than {} MiB", MAX_UNIT >> 20));
        }
        if matches!(self.state, State::Handed) {
            return Feed::Unsupported { version: self.version.clone(), prefix: std::mem::take(&mut self.prefix) };
        }
        Feed::Continue
    }

    /// The verdict once the archive has ended.
    pub fn finish(self) -> Result<Summary, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let at = self.bytes + self.pending.len() as u64;
        let inside = match &self.state {
            State::Block if self.pending.is_empty() => None,
            State::Header => Some("its header".to_string()),
            State::TocCount | State::Toc { .. } => Some("its table of contents".to_string()),
            State::Block | State::BlockId { .. } => Some("a block header".to_string()),
            State::ChunkLen { id, .. } | State::Chunk { id, .. } | State::BlobOid { id } => {
                Some(format!("the data of {}", self.describe(*id)))
            }
            State::Failed | State::Handed => Some("an unchecked part".to_string()),
        };
        if let Some(inside) = inside {
            return Err(format!("the archive ends inside {inside} after {at} bytes: the dump is truncated"));
        }
        let missing: Vec<&String> =
            self.with_data.iter().filter(|(id, _)| !self.seen.contains(id)).map(|(_, d)| d).collect();
        if let Some(first) = missing.first() {
            return Err(format!(
                "the archive ends after {at} bytes without the data of {} table of contents entr{} (first: {first}): \
                 the dump is truncated",
                missing.len(),
                if missing.len() == 1 { "y" } else { "ies" }
            ));
        }
        Ok(Summary {
            version: self.version,
            toc_entries: self.toc_entries,
            data_blocks: self.seen.len() as u64,
            bytes: self.bytes,
        })
    }

    fn describe(&self, id: i64) -> String {
        self.with_data.get(&id).cloned().unwrap_or_else(|| format!("dump id {id}"))
    }

    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(format!("{why} (at byte {})", self.bytes));
        }
        self.state = State::Failed;
        self.pending = Vec::new();
        self.prefix = Vec::new();
    }

    /// Processes as much of `buf` as forms whole units; returns the bytes consumed.
    fn run(&mut self, buf: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            if let State::Chunk { id, blob, left } = self.state {
                let n = (buf.len() - pos).min(usize::try_from(left).unwrap_or(usize::MAX));
                pos += n;
                self.bytes += n as u64;
                let left = left - n as u64;
                self.state = if left == 0 { State::ChunkLen { id, blob } } else { State::Chunk { id, blob, left } };
                if left > 0 {
                    return pos;
                }
                continue;
            }
            if matches!(self.state, State::Failed | State::Handed) || pos == buf.len() {
                return pos;
            }
            let mut c = Cursor { buf: &buf[pos..], pos: 0 };
            match self.step(&mut c) {
                Err(More) => return pos,
                Ok(Err(why)) => {
                    self.fail(why);
                    return pos;
                }
                Ok(Ok(())) => {
                    pos += c.pos;
                    self.bytes += c.pos as u64;
                }
            }
        }
    }

    /// Parses one unit at the cursor and moves to the next state. Nothing changes unless the unit is whole.
    fn step(&mut self, c: &mut Cursor<'_>) -> Unit<()> {
        match self.state {
            State::Header => self.header(c),
            State::TocCount => {
                let l = self.layout();
                let n = c.int(l)?;
                if !(0..=100_000_000).contains(&n) {
                    return Ok(Err(format!("implausible table of contents size {n}")));
                }
                self.state = if n == 0 { State::Block } else { State::Toc { left: n as u64 } };
                Ok(Ok(()))
            }
            State::Toc { left } => {
                let entry = match self.toc_entry(c)? {
                    Ok(e) => e,
                    Err(why) => return Ok(Err(why)),
                };
                self.toc_entries += 1;
                if let Some((id, what)) = entry {
                    self.with_data.insert(id, what);
                }
                self.state = if left == 1 { State::Block } else { State::Toc { left: left - 1 } };
                Ok(Ok(()))
            }
            State::Block => {
                let t = c.byte()?;
                self.state = match t {
                    BLK_DATA => State::BlockId { blobs: false },
                    BLK_BLOBS => State::BlockId { blobs: true },
                    other => return Ok(Err(format!("unknown block type {other:#04x}: the archive is damaged"))),
                };
                Ok(Ok(()))
            }
            State::BlockId { blobs } => {
                let id = c.int(self.layout())?;
                if !self.with_data.contains_key(&id) {
                    return Ok(Err(format!(
                        "a data block for dump id {id}, which the table of contents does not list"
                    )));
                }
                if !self.seen.insert(id) {
                    return Ok(Err(format!("the data of {} appears twice", self.describe(id))));
                }
                self.state = if blobs { State::BlobOid { id } } else { State::ChunkLen { id, blob: false } };
                Ok(Ok(()))
            }
            State::ChunkLen { id, blob } => {
                let n = c.int(self.layout())?;
                self.state = match n {
                    0 if blob => State::BlobOid { id },
                    0 => State::Block,
                    n if n < 0 => {
                        return Ok(Err(format!("a negative chunk length in the data of {}", self.describe(id))));
                    }
                    n => State::Chunk { id, blob, left: n as u64 },
                };
                Ok(Ok(()))
            }
            State::BlobOid { id } => {
                let oid = c.int(self.layout())?;
                self.state = if oid == 0 { State::Block } else { State::ChunkLen { id, blob: true } };
                Ok(Ok(()))
            }
            State::Chunk { .. } | State::Failed | State::Handed => Ok(Ok(())),
        }
    }

    fn layout(&self) -> Layout {
        self.layout.unwrap_or(Layout { minor: 0, int_size: 4, off_size: 8 })
    }

    fn header(&mut self, c: &mut Cursor<'_>) -> Unit<()> {
        if c.take(5)? != b"PGDMP" {
            return Ok(Err("not a pg_dump custom-format archive (no PGDMP magic)".into()));
        }
        let (major, minor, rev) = (c.byte()?, c.byte()?, c.byte()?);
        self.version = format!("{major}.{minor}.{rev}");
        if (major, minor) < MIN_VERSION || (major, minor) > MAX_VERSION {
            self.state = State::Handed;
            return Ok(Ok(()));
        }
        let int_size = c.byte()? as usize;
        let off_size = c.byte()? as usize;
        if !(1..=8).contains(&int_size) || !(1..=8).contains(&off_size) {
            return Ok(Err(format!("implausible integer sizes {int_size}/{off_size} in the archive header")));
        }
        let l = Layout { minor, int_size, off_size };
        let format = c.byte()?;
        if format != FORMAT_CUSTOM {
            return Ok(Err(format!("archive format {format} is not pg_dump's custom format")));
        }
        if minor >= 15 {
            c.byte()?; // compression algorithm
        } else {
            c.int(l)?; // compression level
        }
        for _ in 0..7 {
            c.int(l)?; // creation time
        }
        for _ in 0..3 {
            // database name, server version, pg_dump version
            if let Err(n) = c.string(l)? {
                return Ok(Err(format!("a string of length {n} in the archive header")));
            }
        }
        self.layout = Some(l);
        self.state = State::TocCount;
        Ok(Ok(()))
    }

    /// One table of contents entry: `Some((dump id, description))` when it has data.
    fn toc_entry(&self, c: &mut Cursor<'_>) -> Unit<Option<(i64, String)>> {
        let l = self.layout();
        let text =
            |s: Option<&[u8]>| String::from_utf8_lossy(s.unwrap_or_default()).chars().take(200).collect::<String>();
        macro_rules! string {
            () => {
                match c.string(l)? {
                    Ok(s) => s,
                    Err(n) => return Ok(Err(format!("a string of length {n} in the table of contents"))),
                }
            };
        }
        let id = c.int(l)?;
        let had_dumper = c.int(l)? != 0;
        string!(); // tableoid
        string!(); // oid
        let tag = text(string!());
        let desc = text(string!());
        c.int(l)?; // section
        string!(); // definition
        string!(); // drop statement
        string!(); // copy statement
        let namespace = text(string!());
        string!(); // tablespace
        if l.minor >= 14 {
            string!(); // table access method
        }
        if l.minor >= 16 {
            c.int(l)?; // relkind
        }
        string!(); // owner
        string!(); // "false" (WITH OIDS)
        while string!().is_some() {} // dependencies, ended by NULL
        let flag = c.byte()?; // custom format: data offset
        c.take(l.off_size)?;
        if !(1..=3).contains(&flag) {
            return Ok(Err(format!("unknown data offset flag {flag} in the table of contents entry of {desc} {tag}")));
        }
        Ok(Ok(had_dumper.then(|| {
            let name = if namespace.is_empty() { tag } else { format!("{namespace}.{tag}") };
            (id, format!("{desc} {name}"))
        })))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes archives the way pg_dump's custom format does (for `minor` 12..16), for tests.
    pub(crate) struct Writer {
        pub out: Vec<u8>,
        minor: u8,
    }

    impl Writer {
        pub fn new(minor: u8) -> Self {
            Writer { out: Vec::new(), minor }
        }
        pub fn int(&mut self, v: i64) {
            self.out.push(u8::from(v < 0));
            self.out.extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
        }
        pub fn string(&mut self, s: Option<&str>) {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.out.extend_from_slice(s.as_bytes());
                }
            }
        }
        pub fn header(&mut self) {
            self.out.extend_from_slice(b"PGDMP");
            self.out.extend_from_slice(&[1, self.minor, 0, 4, 8, FORMAT_CUSTOM]);
            if self.minor >= 15 {
                self.out.push(0);
            } else {
                self.int(0);
            }
            for v in [5, 4, 3, 29, 10, 126, 0] {
                self.int(v);
            }
            for s in ["crm", "17.2", "17.2"] {
                self.string(Some(s));
            }
        }
        /// A table of contents entry; `data` marks one whose data block follows.
        pub fn entry(&mut self, id: i64, desc: &str, tag: &str, data: bool) {
            self.int(id);
            self.int(i64::from(data));
            self.string(Some("1259"));
            self.string(Some("16384"));
            self.string(Some(tag));
            self.string(Some(desc));
            self.int(if data { 3 } else { 2 });
            self.string(Some(if data { "" } else { "CREATE TABLE t (a int);\n" }));
            self.string(Some(""));
            self.string(if data { Some("COPY t (a) FROM stdin;\n") } else { None });
            self.string(Some("public"));
            self.string(Some(""));
            if self.minor >= 14 {
                self.string(Some("heap"));
            }
            if self.minor >= 16 {
                self.int(114);
            }
            self.string(Some("crm"));
            self.string(Some("false"));
            self.string(Some("7"));
            self.string(Some("12"));
            self.string(None);
            self.out.push(if data { 1 } else { 3 });
            self.out.extend_from_slice(&[0; 8]);
        }
        pub fn data(&mut self, id: i64, chunks: &[&[u8]]) {
            self.out.push(BLK_DATA);
            self.int(id);
            for c in chunks {
                self.int(c.len() as i64);
                self.out.extend_from_slice(c);
            }
            self.int(0);
        }
        pub fn blobs(&mut self, id: i64, blobs: &[(i64, &[u8])]) {
            self.out.push(BLK_BLOBS);
            self.int(id);
            for (oid, bytes) in blobs {
                self.int(*oid);
                self.int(bytes.len() as i64);
                self.out.extend_from_slice(bytes);
                self.int(0);
            }
            self.int(0);
        }
    }

    /// A small archive: a schema entry, two tables with data (one empty), large objects.
    pub(crate) fn archive(minor: u8) -> Vec<u8> {
        let mut w = Writer::new(minor);
        w.header();
        w.int(5);
        w.entry(10, "TABLE", "contacts", false);
        w.entry(11, "TABLE DATA", "contacts", true);
        w.entry(12, "TABLE DATA", "empty", true);
        w.entry(13, "BLOBS", "BLOBS", true);
        w.entry(14, "INDEX", "contacts_pkey", false);
        w.data(11, &[b"1\tAda\n2\tGrace\n", &[b'x'; 3000]]);
        w.data(12, &[]);
        w.blobs(13, &[(16400, b"\x89PNG...."), (16401, &[7u8; 700])]);
        w.out
    }

    fn check(bytes: &[u8], piece: usize) -> Result<Summary, String> {
        let mut c = PgArchiveCheck::new();
        for p in bytes.chunks(piece.max(1)) {
            assert_eq!(c.feed(p), Feed::Continue);
        }
        c.finish()
    }

    #[test]
    fn whole_archives_of_every_known_version_pass_however_they_are_split() {
        for minor in 12..=16 {
            let a = archive(minor);
            for piece in [1, 2, 3, 5, 7, 64, 1000, a.len()] {
                let s = check(&a, piece).unwrap_or_else(|e| panic!("1.{minor} in pieces of {piece}: {e}"));
                assert_eq!((s.toc_entries, s.data_blocks, s.bytes), (5, 3, a.len() as u64));
                assert_eq!(s.version, format!("1.{minor}.0"));
            }
        }
    }

    #[test]
    fn every_truncation_fails_and_says_where() {
        for minor in [14, 16] {
            let a = archive(minor);
            for cut in 0..a.len() {
                // Byte-by-byte feeding for a sample of the cuts (it is slow in debug builds).
                for piece in if cut % 11 == 0 { vec![1, 4096] } else { vec![4096] } {
                    let e = check(&a[..cut], piece).expect_err(&format!("1.{minor} cut at {cut} passed"));
                    assert!(e.contains("truncated"), "{e}");
                }
            }
        }
        // Cut exactly between two blocks: the missing one is named.
        let mut w = Writer::new(16);
        w.header();
        w.int(2);
        w.entry(11, "TABLE DATA", "contacts", true);
        w.entry(12, "TABLE DATA", "invoices", true);
        w.data(11, &[b"1\n"]);
        let e = check(&w.out, 3).unwrap_err();
        assert!(e.contains("TABLE DATA public.invoices") && e.contains("1 table of contents entry"), "{e}");
    }

    #[test]
    fn damage_is_named() {
        let a = archive(16);
        let mut other = a.clone();
        other[0] = b'X';
        assert!(check(&other, 100).unwrap_err().contains("PGDMP"));

        // Trailing bytes after the last block.
        let mut trailing = a.clone();
        trailing.extend_from_slice(b"junk");
        assert!(check(&trailing, 100).unwrap_err().contains("unknown block type"));

        // A block twice, and one for an entry without data.
        let mut w = Writer::new(15);
        w.header();
        w.int(2);
        w.entry(11, "TABLE DATA", "contacts", true);
        w.entry(10, "TABLE", "contacts", false);
        let base = w.out.clone();
        w.data(11, &[b"1\n"]);
        w.data(11, &[b"1\n"]);
        assert!(check(&w.out, 100).unwrap_err().contains("appears twice"));
        let mut w2 = Writer { out: base, minor: 15 };
        w2.data(10, &[b"1\n"]);
        assert!(check(&w2.out, 100).unwrap_err().contains("does not list"));
    }

    #[test]
    fn unknown_versions_are_handed_over_with_every_byte_seen() {
        let mut a = archive(16);
        a[6] = 17;
        let mut c = PgArchiveCheck::new();
        assert_eq!(c.feed(&a[..3]), Feed::Continue);
        match c.feed(&a[3..40]) {
            Feed::Unsupported { version, prefix } => {
                assert_eq!(version, "1.17.0");
                assert_eq!(prefix, &a[..40]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.feed(&a[40..]), Feed::Continue);
    }
}
