//! Rows read, from the database's statement statistics. PostgreSQL's `pg_stat_statements` counts, per database user
//! and normalized statement (its literals already replaced by `$1`, `$2`, ... by the server), how often it ran and
//! the rows it returned. Sampled at every read of the monitor, the growth of those counters since the previous
//! sample is what each user read since; the tables a statement reads come from its normalized text.
//!
//! MariaDB's `performance_schema` has no counter per user and statement: it counts rows per normalized statement
//! (`events_statements_summary_by_digest`, of every user) and per user (`events_statements_summary_by_user_by_event_name`,
//! of every statement). A user's rows of a table are then at most the lesser of the two growths, counted for the
//! users the audit log places at the table: an upper bound, exact when one user reads the table or reads nothing
//! else. Pure: the controller's `statistics` module runs the queries.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::Timestamp;

use super::attribution::Identities;
use super::rules::Found;
use crate::api::access_monitor::FindingRule;

/// One row of `pg_stat_statements` (the statement's text aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counted {
    pub userid: u32,
    /// The role's name, unquoted (`unknown (OID=...)` once the role was dropped).
    pub user: String,
    pub queryid: i64,
    pub calls: i64,
    pub rows: i64,
}

/// What a normalized statement does: whether it only reads, and the tables (`schema.table`) it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Statement {
    pub read: bool,
    pub tables: Vec<String>,
}

/// SQL words after which a name is no table (the end of a FROM list, a clause).
const CLAUSE_WORDS: &[&str] = &[
    "where",
    "group",
    "order",
    "limit",
    "offset",
    "having",
    "window",
    "union",
    "except",
    "intersect",
    "join",
    "straight_join",
    "on",
    "using",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "lateral",
    "for",
    "fetch",
    "returning",
    "set",
    "values",
    "select",
    "as",
    "into",
    "with",
    "only",
    "tablesample",
    "outer",
    "from",
    "by",
    "and",
    "or",
    "not",
];

/// A token of a normalized statement.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// An identifier or keyword: unquoted ones lower-cased (as PostgreSQL folds them), quoted ones as written.
    Word {
        text: String,
        quoted: bool,
    },
    Punct(char),
}

fn tokens(sql: &str) -> Vec<Token> {
    let c: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '-' && c.get(i + 1) == Some(&'-') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            i += 2;
            while i < c.len() && !(c[i] == '*' && c.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if ch == '\'' {
            // A literal the server left in (e.g. in a utility statement): skipped whole, never kept.
            i += 1;
            while i < c.len() {
                if c[i] == '\'' && c.get(i + 1) == Some(&'\'') {
                    i += 2;
                } else if c[i] == '\'' {
                    break;
                } else {
                    i += 1;
                }
            }
            i += 1;
            out.push(Token::Punct('\''));
        } else if ch == '"' || ch == '`' {
            let mut text = String::new();
            i += 1;
            while i < c.len() {
                if c[i] == ch && c.get(i + 1) == Some(&ch) {
                    text.push(ch);
                    i += 2;
                } else if c[i] == ch {
                    break;
                } else {
                    text.push(c[i]);
                    i += 1;
                }
            }
            i += 1;
            out.push(Token::Word { text, quoted: true });
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '$') {
                i += 1;
            }
            out.push(Token::Word { text: c[start..i].iter().collect::<String>().to_lowercase(), quoted: false });
        } else {
            out.push(Token::Punct(ch));
            i += 1;
        }
    }
    out
}

/// The index after the `)` matching the `(` at `open` (or the end).
fn after_parens(t: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, x) in t.iter().enumerate().skip(open) {
        match x {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    t.len()
}

/// The tables a normalized statement of PostgreSQL reads and whether it is a read: a SELECT, VALUES, `TABLE x` or a
/// WITH (also in parentheses) without INSERT, UPDATE, DELETE or MERGE heading a statement, or `COPY x TO` (an
/// export). Tables are taken after FROM, JOIN, TABLE and COPY; a FROM list goes on past a subquery or a function in
/// it; names a WITH defines are not tables. An unqualified table is taken as `public.` (the default search_path).
pub fn statement(sql: &str) -> Statement {
    statement_in(sql, Some("public"))
}

/// As [`statement`], for a statement whose unqualified tables are in `default` (MariaDB: the statement's default
/// database); without one, an unqualified table is not known and left out. Backquoted names (MariaDB's digests) are
/// quoted names.
pub fn statement_in(sql: &str, default: Option<&str>) -> Statement {
    let t = tokens(sql);
    let word = |i: usize| match t.get(i) {
        Some(Token::Word { text, quoted }) => Some((text.as_str(), *quoted)),
        _ => None,
    };
    let keyword = |i: usize| word(i).filter(|(_, q)| !q).map(|(w, _)| w);
    let punct = |i: usize, p: char| t.get(i) == Some(&Token::Punct(p));
    let first = (0..t.len()).find(|&i| !punct(i, '('));
    let lead = first.and_then(keyword);
    // A data-changing statement heads the statement or a WITH's body (`AS (DELETE ...)`); `FOR UPDATE` is a lock.
    let writes = (0..t.len()).any(|i| {
        matches!(keyword(i), Some("insert" | "update" | "delete" | "merge"))
            && (i == 0 || punct(i - 1, '('))
            && !(i > 0 && keyword(i - 1) == Some("for"))
    });
    let copy_to = lead == Some("copy") && (0..t.len()).any(|i| keyword(i) == Some("to"));
    let read = (matches!(lead, Some("select" | "with" | "table" | "values")) && !writes) || copy_to;
    // Names a WITH defines: `name AS (` after WITH, RECURSIVE or a comma.
    let ctes: BTreeSet<String> = (1..t.len())
        .filter(|&i| {
            keyword(i + 1) == Some("as")
                && punct(i + 2, '(')
                && (matches!(keyword(i - 1), Some("with" | "recursive")) || punct(i - 1, ','))
        })
        .filter_map(|i| word(i).map(|(w, _)| w.to_string()))
        .collect();
    // A name, possibly qualified, at `i`: (schema.table or the unqualified name, tokens used).
    let name_at = |i: usize| -> Option<(String, bool, usize)> {
        let (a, a_quoted) = word(i)?;
        if !a_quoted && CLAUSE_WORDS.contains(&a) {
            return None;
        }
        if punct(i + 1, '.') {
            let (b, _) = word(i + 2)?;
            Some((format!("{a}.{b}"), true, 3))
        } else {
            Some((a.to_string(), false, 1))
        }
    };
    let add = |tables: &mut BTreeSet<String>, name: String, qualified: bool| {
        if qualified {
            tables.insert(name);
        } else if let Some(schema) = default.filter(|_| !ctes.contains(&name)) {
            tables.insert(format!("{schema}.{name}"));
        }
    };
    // A FROM list from `j`: item [AS] [alias], item ...; an item is a table, a function call, a subquery, or a
    // parenthesized table or join. Its subqueries' FROMs and its JOINs are read when the scan comes to them.
    let list = |tables: &mut BTreeSet<String>, mut j: usize| {
        // Parentheses entered around a table (not a subquery's) and not closed yet.
        let mut entered = 0;
        loop {
            if punct(j, '(') {
                let inner = (j..t.len()).find(|&k| !punct(k, '('));
                if inner.and_then(keyword).is_some_and(|w| matches!(w, "select" | "with" | "values" | "table")) {
                    j = after_parens(&t, j);
                } else {
                    // `FROM (invoices)`, `FROM (a JOIN b ON ...)`: the first table is read here.
                    let k = inner.unwrap_or(t.len());
                    entered += k - j;
                    j = k;
                    continue;
                }
            } else if let Some((name, qualified, used)) = name_at(j) {
                if punct(j + used, '(') {
                    j = after_parens(&t, j + used);
                } else {
                    add(tables, name, qualified);
                    j += used;
                }
            } else {
                break;
            }
            while entered > 0 && punct(j, ')') {
                entered -= 1;
                j += 1;
            }
            if keyword(j) == Some("as") {
                j += 1;
            }
            if let Some((w, q)) = word(j)
                && (q || !CLAUSE_WORDS.contains(&w))
            {
                j += 1;
            }
            if punct(j, '(') {
                // Column aliases: `AS s(a, b)`.
                j = after_parens(&t, j);
            }
            if punct(j, ',') {
                j += 1;
            } else {
                break;
            }
        }
    };
    // Parentheses around each token: COPY's own FROM (a file or STDIN) is at depth 0, a query's inside.
    let depth: Vec<usize> = t
        .iter()
        .scan(0usize, |d, x| {
            let here = *d;
            match x {
                Token::Punct('(') => *d += 1,
                Token::Punct(')') => *d = d.saturating_sub(1),
                _ => {}
            }
            Some(here)
        })
        .collect();
    let mut tables = BTreeSet::new();
    // The depths at which a FROM clause is open: a comma there goes on with its list, also after a join's
    // condition (`FROM a JOIN b ON a.id = b.id, invoices`) or a parenthesized join.
    let mut open: BTreeSet<usize> = BTreeSet::new();
    let mut i = 0;
    while i < t.len() {
        let lone = |k: usize| matches!(keyword(k), Some("table" | "copy")) && Some(k) == first;
        match keyword(i) {
            Some("from") if lead == Some("copy") && depth[i] == 0 => i += 1,
            Some("from" | "join" | "straight_join") => {
                if keyword(i) == Some("from") {
                    open.insert(depth[i]);
                }
                let mut j = i + 1;
                if keyword(j) == Some("only") || keyword(j) == Some("lateral") {
                    j += 1;
                }
                list(&mut tables, j);
                // The scan goes on right after FROM: the subqueries in the list have FROMs of their own.
                i += 1;
            }
            Some(
                "where" | "group" | "order" | "limit" | "offset" | "having" | "window" | "union" | "except"
                | "intersect" | "for" | "fetch" | "returning" | "into" | "set",
            ) => {
                open.remove(&depth[i]);
                i += 1;
            }
            _ if punct(i, ')') => {
                open.retain(|&d| d < depth[i]);
                i += 1;
            }
            _ if punct(i, ',') && open.contains(&depth[i]) => {
                list(&mut tables, i + 1);
                i += 1;
            }
            _ if lone(i) => {
                if let Some((name, qualified, used)) = name_at(i + 1) {
                    add(&mut tables, name, qualified);
                    i += used;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    Statement { read, tables: tables.into_iter().collect() }
}

/// The counters of the previous sample, per (role OID, statement): keyed by the role's OID, not its name, which
/// turns into `unknown (OID=...)` when Vault drops a revoked lease's role.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    last: HashMap<(u32, i64), (i64, i64)>,
    /// A sample was taken: the next one's growth is what happened in between.
    primed: bool,
}

/// The rows a user's statement returned between two samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub user: String,
    pub queryid: i64,
    pub rows: i64,
}

impl Counters {
    /// The growth since the previous sample (nothing at the first: what the counters held before is not known to
    /// have happened since the monitor started). A statement whose call count went back (the statistics were
    /// reset, or the statement evicted and counted again) grew by what it holds now.
    pub fn deltas(&mut self, sample: &[Counted]) -> Vec<Delta> {
        let mut now: HashMap<(u32, i64), (i64, i64)> = HashMap::with_capacity(sample.len());
        let mut names: HashMap<u32, &str> = HashMap::new();
        for c in sample {
            // `toplevel` splits a statement in two rows: summed.
            let e = now.entry((c.userid, c.queryid)).or_default();
            e.0 += c.calls;
            e.1 += c.rows;
            names.insert(c.userid, &c.user);
        }
        let mut out = Vec::new();
        if self.primed {
            for (key, grew) in growth(&self.last, &now) {
                let user = names.get(&key.0).copied().unwrap_or_default().to_string();
                out.push(Delta { user, queryid: key.1, rows: grew });
            }
        }
        self.last = now;
        self.primed = true;
        out.sort_by(|a, b| (&a.user, a.queryid).cmp(&(&b.user, b.queryid)));
        out
    }
}

/// Counters as (calls, rows) per key: what grew from `last` to `now`. A key whose calls went back (the statistics
/// were reset, or the statement evicted and counted again) grew by what it holds now; a new key by all it holds.
fn growth<K: Eq + std::hash::Hash + Clone>(
    last: &HashMap<K, (i64, i64)>,
    now: &HashMap<K, (i64, i64)>,
) -> Vec<(K, i64)> {
    now.iter()
        .filter_map(|(key, (calls, rows))| {
            let grew = match last.get(key) {
                Some((c0, r0)) if calls >= c0 => (rows - r0).max(0),
                _ => *rows,
            };
            (grew > 0).then(|| (key.clone(), grew))
        })
        .collect()
}

/// MariaDB: one row of `performance_schema.events_statements_summary_by_digest`: a normalized statement (its
/// digest) run with a default database (`schema`, empty when none), how often it ran and the rows it sent, to every
/// user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestCounted {
    pub schema: String,
    pub digest: String,
    pub calls: i64,
    pub rows: i64,
}

/// MariaDB: a user's statements of every kind, summed from
/// `performance_schema.events_statements_summary_by_user_by_event_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserCounted {
    pub user: String,
    pub calls: i64,
    pub rows: i64,
}

/// MariaDB: the counters of the previous sample, per (default database, digest) and per user.
#[derive(Clone, Debug, Default)]
pub struct Summaries {
    digests: HashMap<(String, String), (i64, i64)>,
    users: HashMap<String, (i64, i64)>,
    primed: bool,
}

/// MariaDB: what grew between two samples: rows per (default database, digest) and rows per user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummaryDeltas {
    pub digests: BTreeMap<(String, String), u64>,
    pub users: BTreeMap<String, u64>,
}

impl Summaries {
    /// The growth since the previous sample (nothing at the first), as [`Counters::deltas`].
    pub fn deltas(&mut self, digests: &[DigestCounted], users: &[UserCounted]) -> SummaryDeltas {
        let mut d: HashMap<(String, String), (i64, i64)> = HashMap::with_capacity(digests.len());
        for c in digests {
            let e = d.entry((c.schema.clone(), c.digest.clone())).or_default();
            e.0 += c.calls;
            e.1 += c.rows;
        }
        let mut u: HashMap<String, (i64, i64)> = HashMap::with_capacity(users.len());
        for c in users {
            let e = u.entry(c.user.clone()).or_default();
            e.0 += c.calls;
            e.1 += c.rows;
        }
        let mut out = SummaryDeltas::default();
        if self.primed {
            let rows = |n: i64| u64::try_from(n).unwrap_or(0);
            out.digests = growth(&self.digests, &d).into_iter().map(|(k, n)| (k, rows(n))).collect();
            out.users = growth(&self.users, &u).into_iter().map(|(k, n)| (k, rows(n))).collect();
        }
        self.digests = d;
        self.users = u;
        self.primed = true;
        out
    }
}

/// A table a statement may read without naming it: a digest text cut short, or the statements MariaDB had no room
/// left to count apart. Its rows count for every table a user was placed at.
pub const ANY_TABLE: &str = "*";

/// MariaDB: the rows of a sample's reads of tables no user was placed at (a statement that ended between a pass's
/// log read and its sample: its READ entry comes with the next read), and each user's rows of that sample. They are
/// offered once more at the next sample, to the users then placed at the table, bounded by those users' rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unplaced {
    tables: BTreeMap<String, u64>,
    users: BTreeMap<String, u64>,
}

/// MariaDB: rows read per (user, table): rows per table from the digests `statements` knows to be reads (a
/// statement's rows count for every table it names), bounded by each user's rows, for the users `readers` places at
/// the table (the audit log's READ entries, with their time): those placed since `recent`; when none was, those
/// placed before (a statement still running since: its rows are counted when it ends). Rows the previous sample
/// could place at nobody (`unplaced`) count too, bounded by the user's rows of that sample; this sample's take
/// their place.
pub fn rows_read_bounded(
    deltas: &SummaryDeltas,
    statements: &HashMap<(String, String), Statement>,
    readers: &BTreeMap<String, BTreeMap<String, Timestamp>>,
    recent: Timestamp,
    unplaced: &mut Unplaced,
) -> BTreeMap<(String, String), u64> {
    let mut per_table: BTreeMap<&str, u64> = BTreeMap::new();
    let mut anywhere = 0u64;
    for (key, rows) in &deltas.digests {
        let Some(s) = statements.get(key).filter(|s| s.read) else { continue };
        for t in &s.tables {
            if t == ANY_TABLE {
                anywhere += rows;
            } else {
                *per_table.entry(t).or_default() += rows;
            }
        }
    }
    let mut out = BTreeMap::new();
    for (table, users) in readers {
        let rows = per_table.get(table.as_str()).copied().unwrap_or(0) + anywhere;
        let earlier = unplaced.tables.get(table).copied().unwrap_or(0);
        if rows == 0 && earlier == 0 {
            continue;
        }
        let lately: Vec<&String> = users.iter().filter(|(_, at)| **at >= recent).map(|(u, _)| u).collect();
        let placed: Vec<&String> = if lately.is_empty() { users.keys().collect() } else { lately };
        for user in placed {
            let now = deltas.users.get(user).copied().unwrap_or(0).min(rows);
            let before = unplaced.users.get(user).copied().unwrap_or(0).min(earlier);
            if now + before > 0 {
                out.insert((user.clone(), table.clone()), now + before);
            }
        }
    }
    *unplaced = Unplaced {
        tables: per_table
            .into_iter()
            .filter(|(t, rows)| *rows > 0 && !readers.contains_key(*t))
            .map(|(t, rows)| (t.to_string(), rows))
            .collect(),
        users: deltas.users.clone(),
    };
    out
}

/// Rows read per (user, table) from `deltas`, for the statements `statements` knows to be reads.
pub fn rows_read(deltas: &[Delta], statements: &HashMap<i64, Statement>) -> BTreeMap<(String, String), u64> {
    let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in deltas {
        let Some(s) = statements.get(&d.queryid).filter(|s| s.read) else { continue };
        for t in &s.tables {
            *out.entry((d.user.clone(), t.clone())).or_default() += u64::try_from(d.rows).unwrap_or(0);
        }
    }
    out
}

/// Rows read in the current minute, carried from one sample to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowMinute {
    /// Minutes since the epoch.
    pub minute: i64,
    pub rows: BTreeMap<(String, String), u64>,
    /// (user, table) flagged this minute.
    pub flagged: BTreeSet<(String, String)>,
}

/// Where the rows were counted, as a finding says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    PgStatStatements,
    /// MariaDB's: an upper bound (see [`rows_read_bounded`]).
    PerformanceSchema,
}

impl Source {
    fn note(self) -> &'static str {
        match self {
            Source::PgStatStatements => "counted by pg_stat_statements",
            Source::PerformanceSchema => {
                "counted by performance_schema: at most the rows of the table's statements and of the user's, while \
                 the audit log places the user at the table"
            }
        }
    }
}

/// `rules.rowVolume` over the rows read since the previous sample, taken at `at`: a finding per identity and table
/// the first time its rows in a minute pass the limit.
pub fn check(
    source: Source,
    limits: &[(Vec<String>, u64)],
    ids: &Identities,
    read: &BTreeMap<(String, String), u64>,
    at: Timestamp,
    minute: &mut RowMinute,
) -> Vec<Found> {
    let m = at.as_second().div_euclid(60);
    if m != minute.minute {
        *minute = RowMinute { minute: m, ..RowMinute::default() };
    }
    let mut out = Vec::new();
    for ((user, table), rows) in read {
        let Some((_, max)) = limits.iter().find(|(tables, _)| tables.contains(table)) else { continue };
        let n = minute.rows.entry((user.clone(), table.clone())).or_default();
        *n += rows;
        if *n > *max && minute.flagged.insert((user.clone(), table.clone())) {
            let who = ids.who(user);
            out.push(Found {
                rule: FindingRule::RowVolume,
                user: user.clone(),
                identity: who.describe(),
                origins: Default::default(),
                object: Some(table.clone()),
                message: format!(
                    "{n} rows of {table} read within a minute by {} (limit {max}; {})",
                    who.describe(),
                    source.note()
                ),
                at,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(read: bool, tables: &[&str]) -> Statement {
        Statement { read, tables: tables.iter().map(ToString::to_string).collect() }
    }

    /// Expected from PostgreSQL's grammar (SELECT's FROM list with subqueries, functions and aliases, JOIN, ONLY,
    /// `TABLE name`, WITH queries, `FOR UPDATE` locks, `COPY ... TO`) and pg_stat_statements' normalized texts,
    /// written before the parser.
    #[test]
    fn the_tables_a_normalized_statement_reads() {
        let cases: &[(&str, Statement)] = &[
            ("SELECT * FROM invoices", st(true, &["public.invoices"])),
            ("select total from crm.invoices where id = $1", st(true, &["crm.invoices"])),
            (
                "SELECT i.total, c.email FROM invoices i JOIN contacts AS c ON c.id = i.customer",
                st(true, &["public.contacts", "public.invoices"]),
            ),
            ("SELECT a FROM invoices, crm.contacts c WHERE $1 = $2", st(true, &["crm.contacts", "public.invoices"])),
            ("SELECT * FROM ONLY \"Invoices\"", st(true, &["public.Invoices"])),
            ("SELECT * FROM generate_series($1, $2)", st(true, &[])),
            ("SELECT $1", st(true, &[])),
            ("SELECT now()", st(true, &[])),
            ("WITH x AS (SELECT id FROM invoices) SELECT count(*) FROM x", st(true, &["public.invoices"])),
            ("WITH a AS (SELECT 1), b AS (SELECT * FROM contacts) SELECT * FROM a, b", st(true, &["public.contacts"])),
            (
                "SELECT * FROM (SELECT id FROM contacts) s LEFT JOIN invoices i USING (id)",
                st(true, &["public.contacts", "public.invoices"]),
            ),
            ("SELECT * FROM generate_series($1, $2) g, invoices", st(true, &["public.invoices"])),
            ("SELECT * FROM (SELECT $1) AS s(a), crm.invoices", st(true, &["crm.invoices"])),
            ("TABLE invoices", st(true, &["public.invoices"])),
            ("(SELECT * FROM invoices)", st(true, &["public.invoices"])),
            ("SELECT * FROM invoices FOR UPDATE", st(true, &["public.invoices"])),
            ("COPY invoices TO STDOUT", st(true, &["public.invoices"])),
            ("COPY crm.invoices (id, total) TO STDOUT WITH (FORMAT csv)", st(true, &["crm.invoices"])),
            ("COPY invoices FROM STDIN", st(false, &["public.invoices"])),
            ("COPY (SELECT * FROM invoices WHERE total > $1) TO STDOUT", st(true, &["public.invoices"])),
            ("WITH d AS (DELETE FROM invoices RETURNING *) SELECT * FROM d", st(false, &["public.invoices"])),
            ("UPDATE invoices SET total = $1 FROM contacts WHERE contacts.id = $2", st(false, &["public.contacts"])),
            ("DELETE FROM invoices WHERE id = $1", st(false, &["public.invoices"])),
            ("INSERT INTO invoices SELECT * FROM staging", st(false, &["public.staging"])),
            ("SELECT 'a FROM secret' FROM contacts -- FROM hidden", st(true, &["public.contacts"])),
            ("/* FROM x */ SELECT * FROM contacts", st(true, &["public.contacts"])),
            (
                "SELECT * FROM (invoices i JOIN contacts c ON c.id = i.id)",
                st(true, &["public.contacts", "public.invoices"]),
            ),
            ("SELECT * FROM ((invoices)) AS i, contacts", st(true, &["public.contacts", "public.invoices"])),
            (
                "SELECT * FROM contacts c JOIN payroll p ON p.id = c.id, invoices WHERE c.id IN ($1, $2)",
                st(true, &["public.contacts", "public.invoices", "public.payroll"]),
            ),
            ("SELECT a, b FROM contacts GROUP BY a, b ORDER BY a, b", st(true, &["public.contacts"])),
        ];
        for (sql, want) in cases {
            assert_eq!(&statement(sql), want, "{sql}");
        }
    }

    fn counted(userid: u32, user: &str, queryid: i64, calls: i64, rows: i64) -> Counted {
        Counted { userid, user: user.into(), queryid, calls, rows }
    }

    fn delta(user: &str, queryid: i64, rows: i64) -> Delta {
        Delta { user: user.into(), queryid, rows }
    }

    #[test]
    fn growth_between_samples_and_none_at_the_first() {
        let mut c = Counters::default();
        assert_eq!(c.deltas(&[counted(7, "v-sales", 1, 10, 1000)]), vec![]);
        let d = c.deltas(&[counted(7, "v-sales", 1, 12, 1500), counted(7, "v-sales", 2, 1, 3)]);
        assert_eq!(d, vec![delta("v-sales", 1, 500), delta("v-sales", 2, 3)]);
        // Nothing ran: nothing grew.
        assert_eq!(c.deltas(&[counted(7, "v-sales", 1, 12, 1500), counted(7, "v-sales", 2, 1, 3)]), vec![]);
        // Vault dropped the role: its name changes, its counters do not; nothing ran.
        assert_eq!(c.deltas(&[counted(7, "unknown (OID=7)", 1, 12, 1500)]), vec![]);
        // Reset (pg_stat_statements_reset()): what it holds now is new.
        assert_eq!(c.deltas(&[counted(7, "v-sales", 1, 1, 40)]), vec![delta("v-sales", 1, 40)]);
        // The same statement at top level and nested: one.
        let d = c.deltas(&[counted(7, "v-sales", 1, 2, 50), counted(7, "v-sales", 1, 1, 5)]);
        assert_eq!(d, vec![delta("v-sales", 1, 15)]);
    }

    #[test]
    fn rows_are_counted_per_table_read_and_a_minute_is_flagged_once() {
        let statements: HashMap<i64, Statement> = [
            (1, st(true, &["public.invoices"])),
            (2, st(true, &["public.invoices", "public.contacts"])),
            (3, st(false, &["public.invoices"])),
        ]
        .into();
        let deltas = vec![delta("u", 1, 600), delta("u", 2, 50), delta("u", 3, 10_000), delta("u", 4, 10_000)];
        let read = rows_read(&deltas, &statements);
        assert_eq!(
            read,
            [(("u".into(), "public.contacts".into()), 50), (("u".into(), "public.invoices".into()), 650)].into()
        );
        let limits = vec![(vec!["public.invoices".to_string()], 1000)];
        let ids = Identities::default();
        let mut minute = RowMinute::default();
        let t0: Timestamp = "2026-12-01T10:00:05Z".parse().unwrap();
        assert_eq!(check(Source::PgStatStatements, &limits, &ids, &read, t0, &mut minute), vec![]);
        let later: Timestamp = "2026-12-01T10:00:35Z".parse().unwrap();
        let found = check(Source::PgStatStatements, &limits, &ids, &read, later, &mut minute);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].rule, FindingRule::RowVolume);
        assert_eq!(
            found[0].message,
            "1300 rows of public.invoices read within a minute by unknown (limit 1000; counted by pg_stat_statements)"
        );
        let again: Timestamp = "2026-12-01T10:00:50Z".parse().unwrap();
        assert_eq!(
            check(Source::PgStatStatements, &limits, &ids, &read, again, &mut minute),
            vec![],
            "once per minute"
        );
        let next: Timestamp = "2026-12-01T10:01:00Z".parse().unwrap();
        assert_eq!(
            check(Source::PgStatStatements, &limits, &ids, &read, next, &mut minute),
            vec![],
            "a new minute starts from nothing"
        );
    }

    /// Digest texts as MariaDB 10.11's performance_schema wrote them for these statements (seen on the server:
    /// backquoted names, ` . ` between database and table, literals as `?`), with the statement's default database;
    /// expected from MariaDB's name resolution (an unqualified table is in the default database; none: unknown).
    #[test]
    fn the_tables_a_mariadb_digest_reads() {
        let cases: &[(&str, Option<&str>, Statement)] = &[
            ("SELECT * FROM `invoices` WHERE ID < ?", Some("crm"), st(true, &["crm.invoices"])),
            (
                "SELECT * FROM `invoices` `i` JOIN `other` `o` ON `i` . `id` = `o` . `id`",
                Some("crm"),
                st(true, &["crm.invoices", "crm.other"]),
            ),
            ("SELECT * FROM ( SELECT ID FROM `invoices` ) `s`", Some("crm"), st(true, &["crm.invoices"])),
            ("WITH `x` AS ( SELECT * FROM `invoices` ) SELECT * FROM `x`", Some("crm"), st(true, &["crm.invoices"])),
            ("SELECT * FROM `crm` . `invoices` LIMIT ?", None, st(true, &["crm.invoices"])),
            ("SELECT * FROM `invoices`", None, st(true, &[])),
            (
                "( SELECT ID FROM `other` ) UNION ( SELECT ID FROM `crm` . `invoices` )",
                Some("shop"),
                st(true, &["crm.invoices", "shop.other"]),
            ),
            ("SELECT * FROM `In``voices`", Some("crm"), st(true, &["crm.In`voices"])),
            ("SELECT * FROM ( `invoices` )", Some("crm"), st(true, &["crm.invoices"])),
            (
                "SELECT * FROM `other` STRAIGHT_JOIN `invoices` ON `other` . `id` = `invoices` . `id`",
                Some("crm"),
                st(true, &["crm.invoices", "crm.other"]),
            ),
            (
                "SELECT * FROM ( `other` `o` JOIN `crm` . `invoices` `i` ON `o` . `id` = `i` . `id` ) , `contacts`",
                Some("shop"),
                st(true, &["crm.invoices", "shop.contacts", "shop.other"]),
            ),
            (
                "INSERT INTO `crm` . `invoices` SELECT `seq` , ? FROM `seq_1_to_300`",
                Some("crm"),
                st(false, &["crm.seq_1_to_300"]),
            ),
            ("CREATE SYSTEM_USER ? @? IDENTIFIED BY ?", Some("crm"), st(false, &[])),
        ];
        for (sql, default, want) in cases {
            assert_eq!(&statement_in(sql, *default), want, "{sql}");
        }
    }

    fn digest(schema: &str, digest: &str, calls: i64, rows: i64) -> DigestCounted {
        DigestCounted { schema: schema.into(), digest: digest.into(), calls, rows }
    }

    fn user(name: &str, calls: i64, rows: i64) -> UserCounted {
        UserCounted { user: name.into(), calls, rows }
    }

    #[test]
    fn mariadb_rows_of_a_user_at_a_table_are_at_most_the_lesser_growth() {
        let mut s = Summaries::default();
        let first = s.deltas(&[digest("crm", "a1", 1, 999)], &[user("sales", 5, 999)]);
        assert_eq!(first, SummaryDeltas::default(), "nothing at the first sample");
        let d = s.deltas(
            &[digest("crm", "a1", 3, 1299), digest("crm", "b2", 1, 50), digest("", "c3", 1, 7)],
            &[user("sales", 7, 1319), user("finance", 2, 30), user("crm", 1, 7)],
        );
        assert_eq!(
            d.digests,
            [(("".into(), "c3".into()), 7), (("crm".into(), "a1".into()), 300), (("crm".into(), "b2".into()), 50)]
                .into()
        );
        assert_eq!(d.users, [("crm".into(), 7), ("finance".into(), 30), ("sales".into(), 320)].into());
        let statements: HashMap<(String, String), Statement> = [
            (("crm".to_string(), "a1".to_string()), st(true, &["crm.invoices"])),
            (("crm".to_string(), "b2".to_string()), st(true, &["crm.invoices", "crm.contacts"])),
            (("".to_string(), "c3".to_string()), st(false, &["crm.invoices"])),
        ]
        .into();
        let t = |s: &str| -> Timestamp { s.parse().unwrap() };
        let at = |users: &[(&str, &str)]| -> BTreeMap<String, Timestamp> {
            users.iter().map(|(u, when)| (u.to_string(), t(when))).collect()
        };
        let recent = t("2026-12-01T10:00:00Z");
        let mut readers: BTreeMap<String, BTreeMap<String, Timestamp>> = [
            ("crm.invoices".to_string(), at(&[("sales", "2026-12-01T10:00:05Z"), ("finance", "2026-12-01T10:00:01Z")])),
            // Placed there long before, and again lately: only the latter counts.
            ("crm.contacts".to_string(), at(&[("sales", "2026-12-01T10:00:02Z"), ("finance", "2026-12-01T09:40:00Z")])),
        ]
        .into();
        // invoices: 300 + 50 rows of its reads (the write's 7 not); contacts: 50. Sales read 320 rows in all,
        // finance 30; the application user ("crm") read neither table by the audit log.
        assert_eq!(
            rows_read_bounded(&d, &statements, &readers, recent, &mut Unplaced::default()),
            [
                (("finance".into(), "crm.invoices".into()), 30),
                (("sales".into(), "crm.contacts".into()), 50),
                (("sales".into(), "crm.invoices".into()), 320),
            ]
            .into()
        );
        // A statement that began before `recent` and ended since: whoever was placed at the table, earlier.
        readers.insert("crm.contacts".into(), at(&[("finance", "2026-12-01T09:40:00Z")]));
        assert_eq!(
            rows_read_bounded(&d, &statements, &readers, recent, &mut Unplaced::default()),
            [
                (("finance".into(), "crm.contacts".into()), 30),
                (("finance".into(), "crm.invoices".into()), 30),
                (("sales".into(), "crm.invoices".into()), 320),
            ]
            .into()
        );
        // Rows of statements whose tables are not known (a cut text, the digests past the server's room): every
        // table a user was placed at.
        let unknown: HashMap<(String, String), Statement> =
            [(("".to_string(), "".to_string()), st(true, &[ANY_TABLE]))].into();
        let d2 =
            SummaryDeltas { digests: [(("".into(), "".into()), 500)].into(), users: [("sales".into(), 500)].into() };
        assert_eq!(
            rows_read_bounded(&d2, &unknown, &readers, recent, &mut Unplaced::default()),
            [(("sales".into(), "crm.invoices".into()), 500)].into()
        );
        // A read that ended before its READ entry was read: nobody is placed at the table at its sample; at the next
        // one the user is, and the rows are theirs (bounded by their rows of that sample), once.
        let mut unplaced = Unplaced::default();
        let d3 = SummaryDeltas {
            digests: [(("crm".into(), "a1".into()), 300)].into(),
            users: [("sales".into(), 300), ("finance".into(), 40)].into(),
        };
        let nobody = BTreeMap::new();
        assert_eq!(rows_read_bounded(&d3, &statements, &nobody, recent, &mut unplaced), BTreeMap::new());
        let placed: BTreeMap<String, BTreeMap<String, Timestamp>> = [(
            "crm.invoices".to_string(),
            at(&[("sales", "2026-12-01T10:00:06Z"), ("finance", "2026-12-01T10:00:06Z")]),
        )]
        .into();
        assert_eq!(
            rows_read_bounded(&SummaryDeltas::default(), &statements, &placed, recent, &mut unplaced),
            [(("finance".into(), "crm.invoices".into()), 40), (("sales".into(), "crm.invoices".into()), 300)].into()
        );
        assert_eq!(
            rows_read_bounded(&SummaryDeltas::default(), &statements, &placed, recent, &mut unplaced),
            BTreeMap::new(),
            "offered once"
        );
        // A reset (TRUNCATE of the summary): what it holds now is new.
        let d = s.deltas(&[digest("crm", "a1", 1, 40)], &[user("sales", 1, 40)]);
        assert_eq!(d.digests, [(("crm".into(), "a1".into()), 40)].into());
        assert_eq!(d.users, [("sales".into(), 40)].into());
    }
}
