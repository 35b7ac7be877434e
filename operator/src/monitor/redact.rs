//! SQL with its literal values taken out, so that a statement can be stored, logged and shown without the customer
//! data it carried: string constants (`'..'`, `E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'`, dollar-quoted `$tag$..$tag$`)
//! and numeric constants become `?`; comments (which may quote data too) are dropped. Identifiers (also quoted
//! ones, `"..."`), keywords, operators and positional parameters (`$1`) stay. The lexical rules are PostgreSQL's
//! ("Lexical Structure" in its manual); MySQL/MariaDB string constants in `'..'` or `".."` follow with
//! [`Dialect::MySql`], where `"` quotes a string, `\` escapes and `#` starts a comment.
//!
//! Redaction errs on the side of removing: an unterminated constant or comment removes the rest of the text.

/// Whose lexical rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// What stands for every removed value.
pub const PLACEHOLDER: char = '?';

/// `sql` with every literal value replaced by [`PLACEHOLDER`] and every comment removed.
pub fn redact(sql: &str, dialect: Dialect) -> String {
    let c: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_' || ch == '$';
    while i < c.len() {
        let ch = c[i];
        let prev = if i > 0 { Some(c[i - 1]) } else { None };
        let after_word = prev.is_some_and(ident);
        match ch {
            // Comments.
            '-' if c.get(i + 1) == Some(&'-') => {
                i = c[i..].iter().position(|&x| x == '\n').map_or(c.len(), |n| i + n);
            }
            '#' if dialect == Dialect::MySql => {
                i = c[i..].iter().position(|&x| x == '\n').map_or(c.len(), |n| i + n);
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                // PostgreSQL nests block comments.
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 || dialect == Dialect::MySql {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            // String constants, with the prefix letters that introduce them.
            '\'' => {
                let backslash = dialect == Dialect::MySql || strip_prefix(&mut out, &c[..i]);
                i = skip_quoted(&c, i, '\'', backslash);
                out.push(PLACEHOLDER);
            }
            '"' if dialect == Dialect::MySql => {
                i = skip_quoted(&c, i, '"', true);
                out.push(PLACEHOLDER);
            }
            // Quoted identifiers stay as they are.
            '"' | '`' => {
                let end = skip_quoted(&c, i, ch, false);
                out.extend(&c[i..end]);
                i = end;
            }
            // Dollar-quoted constants; `$1` is a parameter and stays.
            '$' if dialect == Dialect::Postgres && !after_word => match dollar_tag(&c, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    let end = (body..c.len()).find(|&k| c[k..].starts_with(&tag)).map_or(c.len(), |k| k + tag.len());
                    out.push(PLACEHOLDER);
                    i = end;
                }
                None => {
                    out.push(ch);
                    i += 1;
                }
            },
            // Numeric constants (also `1.5e-3`, `.5`, and what a newer server reads as `0x1F`).
            _ if !after_word
                && (ch.is_ascii_digit() || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))) =>
            {
                i += 1;
                while i < c.len() {
                    let x = c[i];
                    let exponent_sign = (x == '+' || x == '-') && matches!(c[i - 1], 'e' | 'E');
                    if x.is_alphanumeric() || x == '.' || x == '_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                out.push(PLACEHOLDER);
            }
            _ => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// Removes a string constant's prefix (`E`, `B`, `X`, `N`, `U&`) from the output; whether it was `E` (backslash
/// escapes apply).
fn strip_prefix(out: &mut String, before: &[char]) -> bool {
    let word_start = |n: usize| before.len() == n || !before[before.len() - n - 1].is_alphanumeric();
    match before {
        [.., 'U' | 'u', '&'] if word_start(2) => {
            out.truncate(out.len() - 2);
            false
        }
        [.., p @ ('E' | 'e' | 'B' | 'b' | 'X' | 'x' | 'N' | 'n')] if word_start(1) && out.ends_with(*p) => {
            out.pop();
            matches!(p, 'E' | 'e')
        }
        _ => false,
    }
}

/// The index just past the quoted text that starts at `start` (a doubled quote is one quote; with `backslash`, `\`
/// escapes the next character); the end of the text when unterminated.
fn skip_quoted(c: &[char], start: usize, quote: char, backslash: bool) -> usize {
    let mut i = start + 1;
    while i < c.len() {
        if backslash && c[i] == '\\' {
            i += 2;
        } else if c[i] == quote {
            if c.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    c.len()
}

/// The dollar-quote tag (`$$` or `$name$`) that starts at `start`, if one does.
fn dollar_tag(c: &[char], start: usize) -> Option<Vec<char>> {
    let mut i = start + 1;
    if c.get(i).is_some_and(char::is_ascii_digit) {
        return None;
    }
    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
        i += 1;
    }
    (c.get(i) == Some(&'$')).then(|| c[start..=i].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(sql: &str) -> String {
        redact(sql, Dialect::Postgres)
    }

    /// Expected results written from PostgreSQL's "Lexical Structure" (4.1): string constants with doubled quotes,
    /// escape strings, bit strings, dollar quoting, numeric constants, quoted identifiers, nested comments.
    #[test]
    fn literals_become_placeholders_and_identifiers_stay() {
        let cases = [
            (
                "SELECT * FROM crm.invoices WHERE id = 42 AND note = 'it''s secret'",
                "SELECT * FROM crm.invoices WHERE id = ? AND note = ?",
            ),
            ("INSERT INTO t1 (a, b) VALUES (E'line\\'s\\n', 3.5e-10)", "INSERT INTO t1 (a, b) VALUES (?, ?)"),
            ("SELECT B'1001', X'1FF', N'x', U&'d\\0061t'", "SELECT ?, ?, ?, ?"),
            ("SELECT $$it's 'quoted' 12$$, $tag$a$$b$tag$, $1, col$2", "SELECT ?, ?, $1, col$2"),
            (
                "SELECT \"weird\"\"name 7\" FROM \"Crm\".\"Invoices\" -- where email = 'a@b.c'\nLIMIT 5",
                "SELECT \"weird\"\"name 7\" FROM \"Crm\".\"Invoices\" \nLIMIT ?",
            ),
            (
                "/* customer /* 123 */ 'x' */UPDATE deals SET amount = -1.5 WHERE id=.5",
                " UPDATE deals SET amount = -? WHERE id=?",
            ),
            ("SELECT t1.c2, tab_3 FROM s1.t2", "SELECT t1.c2, tab_3 FROM s1.t2"),
            ("SELECT 'unterminated secret", "SELECT ?"),
            ("SELECT 1e+5, 0x1F, 1_000", "SELECT ?, ?, ?"),
        ];
        for (sql, want) in cases {
            assert_eq!(pg(sql), want, "{sql}");
        }
    }

    #[test]
    fn mysql_strings_in_double_quotes_and_backslash_escapes_and_hash_comments_go() {
        let sql =
            "SELECT `name` FROM crm.contacts WHERE email = \"a\\\"b@c.d\" AND city = 'O\\'Hare' # 'x'\nAND id = 9";
        assert_eq!(
            redact(sql, Dialect::MySql),
            "SELECT `name` FROM crm.contacts WHERE email = ? AND city = ? \nAND id = ?"
        );
    }

    #[test]
    fn no_character_of_a_literal_survives() {
        let secrets = ["4111111111111111", "jane@example.com", "s3cr3t"];
        let sql = "UPDATE crm.contacts SET card = '4111111111111111', mail = E'jane@example.com', pw = $x$s3cr3t$x$ \
                   WHERE id = 4111111111111111";
        let out = pg(sql);
        for s in secrets {
            assert!(!out.contains(s), "{s} in {out}");
        }
    }
}
