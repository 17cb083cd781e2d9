//! Checks a template's SQL when it is loaded, before it can run anywhere.
//!
//! A template runs inside the tenant's one transaction, as the tenant's
//! role, on a connection that goes back to a pool. So it must not end or
//! split that transaction (`BEGIN`, `COMMIT`, `ROLLBACK`, …; `CREATE INDEX
//! CONCURRENTLY`, which cannot run in a transaction block), must not leave
//! session state behind (`SET` without `LOCAL`, `LISTEN`, `PREPARE`, temp
//! tables), and must not change the role it runs as (`SET ROLE`, `RESET`).
//!
//! This is a lexer, not a parser: comments, string literals, quoted
//! identifiers and dollar-quoted bodies are skipped, the rest is split at
//! `;`, and each statement's leading keywords are looked at.

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintError {
    /// 1-based line where the statement starts.
    pub line: usize,
    pub reason: String,
}

/// Check one template's SQL.
pub fn check(sql: &str) -> Result<(), LintError> {
    let mut in_atomic_body = false;
    for statement in statements(sql) {
        let words = &statement.words;
        let Some(first) = words.first() else { continue };
        let refuse = |reason: String| {
            Err(LintError {
                line: statement.line,
                reason,
            })
        };
        // `BEGIN ATOMIC … END` bodies of SQL-standard functions hold
        // semicolons of their own; their statements are not ours to judge.
        if in_atomic_body {
            if first == "END" && words.len() == 1 {
                in_atomic_body = false;
            }
            continue;
        }
        if words
            .windows(2)
            .any(|w| w[0] == "BEGIN" && w[1] == "ATOMIC")
        {
            in_atomic_body = true;
            continue;
        }
        let second = words.get(1).map(String::as_str);
        match first.as_str() {
            "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT"
            | "RELEASE" => {
                return refuse(format!(
                    "{first} is not allowed: a template runs inside the tenant's one transaction, \
                     which commits or rolls back as a whole (complete or absent)"
                ))
            }
            "PREPARE" if second == Some("TRANSACTION") => {
                return refuse(
                    "PREPARE TRANSACTION is not allowed: a template runs inside the tenant's one transaction"
                        .into(),
                )
            }
            "PREPARE" | "LISTEN" => {
                return refuse(format!(
                    "{first} is not allowed: it leaves session state on a pooled connection"
                ))
            }
            "RESET" => {
                return refuse(
                    "RESET is not allowed: it would undo the tenant's role or search path, or \
                     session settings of the connection"
                        .into(),
                )
            }
            "SET" => match second {
                Some("LOCAL") => {
                    let third = words.get(2).map(String::as_str);
                    if matches!(third, Some("ROLE") | Some("SESSION")) {
                        return refuse(
                            "SET LOCAL ROLE is not allowed: a template runs as the tenant's own role"
                                .into(),
                        );
                    }
                }
                // Both are scoped to the transaction already.
                Some("TRANSACTION") | Some("CONSTRAINTS") => {}
                Some("ROLE") | Some("SESSION") if words.get(2).map(String::as_str) != Some("CHARACTERISTICS") => {
                    return refuse(
                        "SET ROLE / SET SESSION is not allowed: a template runs as the tenant's own \
                         role, and a session setting would outlive the transaction"
                            .into(),
                    )
                }
                _ => {
                    return refuse(
                        "SET without LOCAL is not allowed: it would outlive the transaction and \
                         leak into the next request on the pooled connection (use SET LOCAL)"
                            .into(),
                    )
                }
            },
            "CREATE" | "DROP" | "REINDEX" if words.iter().any(|w| w == "CONCURRENTLY") => {
                return refuse(format!(
                    "{first} … CONCURRENTLY is not allowed: it cannot run inside a transaction \
                     block, and a template runs inside the tenant's one transaction"
                ))
            }
            "CREATE"
                if matches!(second, Some("TEMP") | Some("TEMPORARY"))
                    || (matches!(second, Some("GLOBAL") | Some("LOCAL"))
                        && matches!(
                            words.get(2).map(String::as_str),
                            Some("TEMP") | Some("TEMPORARY")
                        )) =>
            {
                return refuse(
                    "CREATE TEMP is not allowed: a temporary object outlives the transaction on a \
                     pooled connection"
                        .into(),
                )
            }
            _ if words.windows(2).any(|w| w[0] == "FROM" && w[1] == "CURRENT") => {
                return refuse(
                    "SET … FROM CURRENT is not allowed: it writes the tenant schema's name into                      the function, and a schema built ahead of its signup is renamed when a user                      takes it (set the search path by name-free means, or not at all)"
                        .into(),
                )
            }
            "DECLARE" if words.windows(2).any(|w| w[0] == "WITH" && w[1] == "HOLD") => {
                return refuse(
                    "DECLARE … WITH HOLD is not allowed: the cursor outlives the transaction".into(),
                )
            }
            _ => {}
        }
    }
    Ok(())
}

/// One statement: its leading line and its words, upper-cased, with
/// literals, quoted identifiers and comments left out.
struct Statement {
    line: usize,
    words: Vec<String>,
    /// Where it is in the source, in chars: from its first token to its `;`.
    span: std::ops::Range<usize>,
}

/// The statements of a template, each as its own text (without its `;`),
/// in order. Comments between statements are left out; quotes, dollar
/// quotes and comments inside one are respected, as PostgreSQL's own
/// lexer would. For Citus, which forwards a multi-statement string's whole
/// text to its workers where one statement is expected.
pub fn split(sql: &str) -> Vec<String> {
    let chars: Vec<char> = sql.chars().collect();
    statements(sql)
        .into_iter()
        .map(|s| chars[s.span].iter().collect::<String>())
        .filter(|s| !s.trim().is_empty())
        .collect()
}

fn statements(sql: &str) -> Vec<Statement> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut line = 1;
    let mut start_line: Option<usize> = None;
    let mut start_char: Option<usize> = None;
    let mut i = 0;

    let flush_word = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(word.to_uppercase());
            word.clear();
        }
    };

    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
        }
        // -- comment to the end of the line
        if c == '-' && next == Some('-') {
            flush_word(&mut word, &mut words);
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        // /* nested */ comments
        if c == '/' && next == Some('*') {
            flush_word(&mut word, &mut words);
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            continue;
        }
        // 'string', E'string with \' escapes', "identifier"
        if c == '\'' || c == '"' {
            let backslashes = c == '\'' && word.eq_ignore_ascii_case("e");
            if backslashes {
                word.clear();
            }
            flush_word(&mut word, &mut words);
            start_line.get_or_insert(line);
            start_char.get_or_insert(i);
            // A literal stands in the statement as one neutral word.
            words.push(String::from(if c == '"' { "\"…\"" } else { "'…'" }));
            i += 1;
            while i < chars.len() {
                let d = chars[i];
                if d == '\n' {
                    line += 1;
                }
                if backslashes && d == '\\' {
                    i += 2;
                    continue;
                }
                if d == c {
                    if chars.get(i + 1) == Some(&c) {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        // $tag$ … $tag$
        if c == '$' && word.is_empty() {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            let tag_is_valid = j < chars.len()
                && chars[j] == '$'
                && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit());
            if tag_is_valid {
                let tag: String = chars[i..=j].iter().collect();
                start_line.get_or_insert(line);
                start_char.get_or_insert(i);
                words.push("$…$".into());
                let mut k = j + 1;
                loop {
                    if k >= chars.len() {
                        i = k;
                        break;
                    }
                    if chars[k] == '$' && chars[k..].iter().take(tag.len()).copied().eq(tag.chars())
                    {
                        i = k + tag.chars().count();
                        break;
                    }
                    if chars[k] == '\n' {
                        line += 1;
                    }
                    k += 1;
                }
                continue;
            }
        }
        if c == ';' {
            flush_word(&mut word, &mut words);
            if let Some(l) = start_line.take() {
                out.push(Statement {
                    line: l,
                    words: std::mem::take(&mut words),
                    span: start_char.take().unwrap_or(i)..i,
                });
            }
            i += 1;
            continue;
        }
        if c.is_alphanumeric() || c == '_' {
            start_line.get_or_insert(line);
            start_char.get_or_insert(i);
            word.push(c);
        } else {
            flush_word(&mut word, &mut words);
            if !c.is_whitespace() {
                start_line.get_or_insert(line);
                start_char.get_or_insert(i);
            }
        }
        i += 1;
    }
    flush_word(&mut word, &mut words);
    if let Some(l) = start_line {
        out.push(Statement {
            line: l,
            words,
            span: start_char.unwrap_or(0)..chars.len(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> LintError {
        check(sql).expect_err(sql)
    }

    #[test]
    fn a_template_splits_into_its_statements_as_postgresql_reads_them() {
        let sql = "-- notes\nALTER TABLE t ADD COLUMN n text; -- trailing\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\n\
                   INSERT INTO t (s) VALUES ('a;b', E'c\\';d');\n\
                   /* block; comment */ CREATE INDEX i ON t (n)";
        assert_eq!(
            split(sql),
            [
                "ALTER TABLE t ADD COLUMN n text",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
                "INSERT INTO t (s) VALUES ('a;b', E'c\\';d')",
                "CREATE INDEX i ON t (n)",
            ]
        );
    }

    #[test]
    fn a_function_may_not_keep_the_schema_s_name() {
        let why = refused(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path FROM CURRENT AS $$ SELECT 1 $$",
        );
        assert!(why.reason.contains("FROM CURRENT"), "{why:?}");
        refused("ALTER FUNCTION f() SET search_path FROM CURRENT");
        check("CREATE VIEW v AS SELECT 'FROM CURRENT' AS s, current_date AS d").unwrap();
    }

    #[test]
    fn ordinary_ddl_passes() {
        check(
            "-- notes\nCREATE TABLE notes (id bigserial PRIMARY KEY, body text DEFAULT 'COMMIT;');\n\
             ALTER TABLE experiences ADD COLUMN rating int DEFAULT 0;\n\
             ALTER TABLE experiences ALTER COLUMN rating SET DEFAULT 1;\n\
             UPDATE experiences SET rating = 2;\n\
             CREATE INDEX ON experiences (rating);\n\
             SET LOCAL statement_timeout = '1min';\n\
             CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $fn$ BEGIN COMMIT; RETURN NEW; END $fn$;\n\
             CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\n\
             /* BEGIN; /* nested */ SET x = 1; */\n\
             COMMENT ON TABLE notes IS E'it''s \\' BEGIN';",
        )
        .unwrap();
    }

    #[test]
    fn transaction_control_is_refused_with_its_line() {
        let e = refused("CREATE TABLE a (id int);\n\nCOMMIT;\nCREATE TABLE b (id int);");
        assert_eq!(e.line, 3);
        assert!(
            e.reason.starts_with("COMMIT is not allowed"),
            "{}",
            e.reason
        );
        for sql in [
            "BEGIN;",
            "begin transaction;",
            "START TRANSACTION;",
            "ROLLBACK",
            "end;",
            "SAVEPOINT a;",
            "PREPARE TRANSACTION 'x';",
        ] {
            refused(sql);
        }
    }

    #[test]
    fn concurrent_index_builds_are_refused() {
        let e = refused("create unique index concurrently i on t (a);");
        assert!(e.reason.contains("CONCURRENTLY"), "{}", e.reason);
        refused("DROP INDEX CONCURRENTLY i;");
    }

    #[test]
    fn session_settings_and_role_changes_are_refused() {
        for sql in [
            "SET search_path TO public;",
            "set statement_timeout = 0;",
            "SET SESSION work_mem = '1GB';",
            "SET ROLE postgres;",
            "SET LOCAL ROLE postgres;",
            "SET SESSION AUTHORIZATION postgres;",
            "RESET ROLE;",
            "LISTEN x;",
            "PREPARE p AS SELECT 1;",
            "CREATE TEMP TABLE experiences (id int);",
            "CREATE GLOBAL TEMPORARY TABLE x (id int);",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1;",
        ] {
            refused(sql);
        }
        check("SET LOCAL lock_timeout = '1s'; SET CONSTRAINTS ALL DEFERRED;").unwrap();
    }
}
