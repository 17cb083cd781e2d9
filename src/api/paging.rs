//! What the tenant data routes share: list queries with cursor paging, the
//! page they return, field checks, and enums to and from their stored names.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::domain::ValidationError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// `?q=&limit=&cursor=`; anything else is refused.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Search terms (at most 200 characters).
    #[param(max_length = 200, pattern = "^[^\\u0000]*$")]
    pub q: Option<String>,
    /// Items per page, 1 to 200 (50 when absent).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    pub cursor: Option<String>,
}

/// `?limit=&cursor=` for lists without search; anything else is refused.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 200 (50 when absent).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    pub cursor: Option<String>,
}

impl From<PageQuery> for ListQuery {
    fn from(p: PageQuery) -> ListQuery {
        ListQuery {
            q: None,
            limit: p.limit,
            cursor: p.cursor,
        }
    }
}

impl ListQuery {
    /// The search terms, if any (blank counts as none), at most 200
    /// characters.
    pub fn search(&self) -> Result<Option<&str>, ApiError> {
        match self.q.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(q) if q.chars().count() > 200 => {
                Err(invalid("q", "must be at most 200 characters"))
            }
            Some(q) if q.contains('\0') => Err(invalid("q", "must not contain NUL characters")),
            Some(q) => Ok(Some(q)),
        }
    }

    /// The search terms as input for `websearch_to_tsquery`.
    pub fn web_search(&self) -> Result<Option<WebSearch>, ApiError> {
        Ok(self.search()?.map(WebSearch::parse))
    }

    /// 1..=200, 50 when absent.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(invalid("limit", "must be between 1 and 200")),
        }
    }

    /// The decoded cursor: the sort key of the last item of the previous
    /// page, as `parts` strings, each parsed by the caller with
    /// [`cursor_part`].
    pub fn cursor(&self, kind: &str, parts: usize) -> Result<Option<Vec<String>>, ApiError> {
        // An empty cursor is the first page (as when absent).
        let Some(raw) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        if raw.len() > MAX_CURSOR_LEN {
            return Err(bad_cursor());
        }
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad_cursor())?;
        let (found, values): (String, Vec<String>) =
            serde_json::from_slice(&bytes).map_err(|_| bad_cursor())?;
        if found != kind || values.len() != parts {
            return Err(bad_cursor());
        }
        Ok(Some(values))
    }
}

/// Longest cursor accepted: the longest one a list makes (a skill's
/// 200-character name, every character escaped in JSON) with room to spare.
const MAX_CURSOR_LEN: usize = 4096;

/// Longest text part of a cursor, in characters: sort keys are names of at
/// most 300 characters (lower-casing may change a name's length a little).
const MAX_CURSOR_TEXT: usize = 1000;

fn bad_cursor() -> ApiError {
    invalid("cursor", "is not a cursor this list returned")
}

/// A value a cursor can carry, parsed only into what the lists' queries
/// accept as parameters: whatever parses here, PostgreSQL takes.
pub trait CursorPart: Sized {
    fn parse_part(value: &str) -> Option<Self>;
}

/// Ids and positions: never negative (an OFFSET must not be).
impl CursorPart for i64 {
    fn parse_part(value: &str) -> Option<i64> {
        value.parse().ok().filter(|n: &i64| *n >= 0)
    }
}

/// Search ranks: `ts_rank` gives finite, non-negative values.
impl CursorPart for f32 {
    fn parse_part(value: &str) -> Option<f32> {
        value
            .parse()
            .ok()
            .filter(|r: &f32| r.is_finite() && *r >= 0.0)
    }
}

/// Sort keys: text without NUL (which PostgreSQL text cannot hold).
impl CursorPart for String {
    fn parse_part(value: &str) -> Option<String> {
        (!value.contains('\0') && value.chars().count() <= MAX_CURSOR_TEXT)
            .then(|| value.to_owned())
    }
}

/// Dates within years 1 to 9999: chrono reaches further back than
/// PostgreSQL's `date` and `timestamptz`.
impl CursorPart for NaiveDate {
    fn parse_part(value: &str) -> Option<NaiveDate> {
        value
            .parse()
            .ok()
            .filter(|d: &NaiveDate| (1..=9999).contains(&d.year()))
    }
}

impl CursorPart for DateTime<Utc> {
    fn parse_part(value: &str) -> Option<DateTime<Utc>> {
        value
            .parse()
            .ok()
            .filter(|t: &DateTime<Utc>| (1..=9999).contains(&t.year()))
    }
}

/// Parse one part of a cursor.
pub fn cursor_part<T: CursorPart>(value: &str) -> Result<T, ApiError> {
    T::parse_part(value).ok_or_else(bad_cursor)
}

/// Search terms rewritten for `websearch_to_tsquery` to mean what they
/// meant, in a form PostgreSQL always accepts. Its parser keeps pending
/// operators on a stack of 32: a run of `-` (each one a NOT) with no word
/// between them overflows it ("tsquery stack too small"). Here
/// every word and quoted phrase carries at most one `-`, the parity of the
/// dashes before it (PostgreSQL reads `--x` as `!!x`); dashes inside words
/// stay; the characters that PostgreSQL skips between words
/// (`! & | ( ) <`) become spaces, as do runs of white space. A quote
/// without a closing one is dropped, as PostgreSQL drops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSearch(String);

/// What `websearch_to_tsquery` skips where it expects a word.
const TSQUERY_OPERATORS: [char; 6] = ['!', '&', '|', '(', ')', '<'];

impl WebSearch {
    pub fn parse(terms: &str) -> WebSearch {
        let segments: Vec<&str> = terms.split('"').collect();
        let quotes = segments.len() - 1;
        let mut tokens: Vec<String> = Vec::new();
        let mut negate = false;
        for (i, segment) in segments.iter().enumerate() {
            let words = segment
                .split(|c: char| c.is_whitespace() || TSQUERY_OPERATORS.contains(&c))
                .filter(|w| !w.is_empty());
            // Segments between the quotes of a pair are phrases.
            if i % 2 == 1 && i < quotes {
                let phrase = words.collect::<Vec<_>>().join(" ");
                if !phrase.is_empty() {
                    tokens.push(format!("{}\"{phrase}\"", if negate { "-" } else { "" }));
                }
                negate = false;
                continue;
            }
            for word in words {
                let bare = word.trim_start_matches('-');
                negate ^= (word.len() - bare.len()) % 2 == 1;
                if !bare.is_empty() {
                    tokens.push(format!("{}{bare}", if negate { "-" } else { "" }));
                    negate = false;
                }
            }
        }
        WebSearch(tokens.join(" "))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An opaque cursor for the sort key `parts` of the last item of a page.
pub fn make_cursor(kind: &str, parts: &[String]) -> String {
    let json = serde_json::to_vec(&(kind, parts)).expect("strings serialise");
    URL_SAFE_NO_PAD.encode(json)
}

/// Most bytes of JSON a page's items take. A page stops early, with a
/// `next_cursor`, when the next item would pass this: what one request
/// sends stays bounded whatever `limit` and the items' sizes are.
pub const PAGE_BYTES: usize = 1024 * 1024;

/// One page of a list, in order: at most `limit` items and at most 1 MB of
/// them (a page may stop early at that size, with a `next_cursor`); keep
/// following `next_cursor` until it is null, which it is on the last page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; null on the last page. A page stops
    /// early when its items reach 1 MB of JSON.
    pub next_cursor: Option<String>,
}

impl<T: Serialize> Page<T> {
    /// `rows` were fetched with `limit + 1`: the extra one says whether
    /// there is a next page, and `key` gives the cursor of the last item.
    /// Items past [`PAGE_BYTES`] are left to the next page.
    pub fn from_rows(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Page<T> {
        let more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        let fit = fitting(&items, PAGE_BYTES);
        let more = more || fit < items.len();
        items.truncate(fit);
        let next_cursor = if more { items.last().map(key) } else { None };
        Page { items, next_cursor }
    }
}

/// How many of `items`, from the first, fit in `budget` bytes of JSON
/// (with their separators); at least one, so a list always moves on.
fn fitting<T: Serialize>(items: &[T], budget: usize) -> usize {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        used += serialized_len(item) + 1;
        if used > budget && i > 0 {
            return i;
        }
    }
    items.len()
}

/// The name a serde enum has in JSON (and in the tenant's CHECKs).
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("unit enum variants serialise as strings"),
    }
}

/// A stored enum value back; one the enum does not know is a fault.
pub fn from_wire<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| ApiError::internal(std::io::Error::other(format!("unknown value {s:?}"))))
}

pub fn invalid(field: &'static str, reason: &str) -> ApiError {
    ApiError::Validation(ValidationError::new(field, reason))
}

/// A required text field: trimmed length (in characters) within bounds.
pub fn text(field: &'static str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = value.trim().chars().count();
    if n < min || value.chars().count() > max {
        return Err(invalid(
            field,
            &if min > 0 {
                format!("must be {min} to {max} characters")
            } else {
                format!("must be at most {max} characters")
            },
        ));
    }
    if value.contains('\0') {
        return Err(invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// An optional text field.
pub fn opt_text(
    field: &'static str,
    value: Option<&str>,
    min: usize,
    max: usize,
) -> Result<(), ApiError> {
    value.map_or(Ok(()), |v| text(field, v, min, max))
}

/// Largest magnitude of a number in stored JSON, and smallest of one that
/// is not 0. PostgreSQL keeps a `jsonb` number as an exact decimal and
/// writes out every digit on each read (1e300 comes back as 301 digits,
/// 1e-300 as 302), so a few bytes stored could make every later read of
/// them large. Numbers arrive as doubles (at most 17 significant digits),
/// so within these bounds one is written out in at most 34 characters.
pub const MAX_JSON_NUMBER: f64 = 1e15;
pub const MIN_JSON_NUMBER: f64 = 1e-15;

/// Largest stored JSON object, as serialised.
pub const MAX_JSON_BYTES: usize = 16 * 1024;

/// A JSON object small enough to store, and whose numbers read back small.
pub fn object(
    field: &'static str,
    value: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), ApiError> {
    let size = serialized_len(value);
    if size > MAX_JSON_BYTES {
        return Err(invalid(field, "must be at most 16 kB of JSON"));
    }
    if serde_json::to_string(value).is_ok_and(|s| s.contains("\\u0000")) {
        return Err(invalid(field, "must not contain NUL characters"));
    }
    if !value.values().all(numbers_in_range) {
        return Err(invalid(
            field,
            "numbers must be 0 or between 1e-15 and 1e15 in magnitude (PostgreSQL keeps every digit)",
        ));
    }
    Ok(())
}

fn numbers_in_range(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| f == 0.0 || (MIN_JSON_NUMBER..=MAX_JSON_NUMBER).contains(&f.abs())),
        serde_json::Value::Array(items) => items.iter().all(numbers_in_range),
        serde_json::Value::Object(map) => map.values().all(numbers_in_range),
        _ => true,
    }
}

/// Bytes of `value` as JSON, counted without keeping them.
pub fn serialized_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to a counter cannot fail; a value that cannot serialise counts
    // what it wrote so far.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// For PATCH bodies: absent stays `None`, `null` becomes `Some(None)`.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(cursor: &str) -> ListQuery {
        ListQuery {
            cursor: Some(cursor.to_owned()),
            ..ListQuery::default()
        }
    }

    #[test]
    fn a_cursor_gives_back_exactly_its_parts_and_only_to_its_own_list() {
        let parts = vec!["c++ \u{1f} \"odd\"".to_string(), "42".to_string()];
        let cursor = make_cursor("s", &parts);
        assert_eq!(query(&cursor).cursor("s", 2).unwrap(), Some(parts));
        assert!(
            query(&cursor).cursor("d", 2).is_err(),
            "another list's cursor"
        );
        assert!(query(&cursor).cursor("s", 1).is_err());
        assert!(query("not base64!").cursor("s", 2).is_err());
        assert!(query(&URL_SAFE_NO_PAD.encode("[1,2]"))
            .cursor("s", 2)
            .is_err());
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_with_a_cursor_at_its_last_item() {
        let item = "x".repeat(PAGE_BYTES / 4);
        let items: Vec<String> = (0..6).map(|i| format!("{i}{item}")).collect();
        let page = Page::from_rows(items.clone(), 200, |s| s[..1].to_owned());
        assert_eq!(page.items, items[..3]);
        assert_eq!(page.next_cursor.as_deref(), Some("2"));
        assert!(serialized_len(&page.items) <= PAGE_BYTES);
        let huge = vec!["y".repeat(2 * PAGE_BYTES), "z".into()];
        let page = Page::from_rows(huge, 200, |s| s[..1].to_owned());
        assert_eq!(page.items.len(), 1, "one item always goes, however large");
        assert_eq!(page.next_cursor.as_deref(), Some("y"));
        let small = Page::from_rows(vec!["a".to_string()], 200, |s| s.clone());
        assert_eq!(small.next_cursor, None);
    }

    #[test]
    fn json_numbers_out_of_range_are_refused() {
        let map = |v: serde_json::Value| v.as_object().unwrap().clone();
        for ok in [
            serde_json::json!({"a": 0, "b": 1e15, "c": -1e-15, "d": [0.1, 123456789.123]}),
            serde_json::json!({"n": {"deep": [-999999999999999.9]}}),
        ] {
            assert!(object("metadata", &map(ok)).is_ok());
        }
        for bad in [
            serde_json::json!({"n": 1e300}),
            serde_json::json!({"n": -1.0000001e15}),
            serde_json::json!({"n": [[{"tiny": 1e-300}]]}),
            serde_json::json!({"n": 9007199254740993u64}),
        ] {
            assert!(object("metadata", &map(bad)).is_err());
        }
    }

    #[test]
    fn limits_and_searches_are_bounded() {
        let q = |limit: Option<i64>, q: Option<&str>| ListQuery {
            q: q.map(str::to_owned),
            limit,
            cursor: None,
        };
        assert_eq!(q(None, None).limit().unwrap(), DEFAULT_LIMIT);
        assert!(q(Some(0), None).limit().is_err());
        assert!(q(Some(MAX_LIMIT + 1), None).limit().is_err());
        assert_eq!(q(None, Some("  ")).search().unwrap(), None);
        assert!(q(None, Some("a\0b")).search().is_err());
        assert!(q(None, Some(&"x".repeat(201))).search().is_err());
    }

    /// A 400 naming `field`, as the handlers answer it.
    fn is_400(result: Result<impl std::fmt::Debug, ApiError>, field: &str) -> bool {
        use actix_web::ResponseError;
        matches!(result, Err(ApiError::Validation(ref v))
            if v.field == field
                && ApiError::Validation(v.clone()).status_code() == actix_web::http::StatusCode::BAD_REQUEST)
    }

    fn cursor_of(parts: &[&str]) -> String {
        make_cursor(
            "k",
            &parts.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_cursor_with_a_negative_offset_is_a_400() {
        let raw = query("WyJpbmR1c3RyaWVzIiwgWyItMSJdXQ");
        let parts = raw.cursor("industries", 1).unwrap().unwrap();
        assert!(is_400(cursor_part::<i64>(&parts[0]), "cursor"));
        assert_eq!(cursor_part::<i64>("0").unwrap(), 0);
    }

    #[test]
    fn a_cursor_part_with_a_nul_is_a_400() {
        let raw = query("WyJzIiwgWyJhXHUwMDAwYiIsICIxIl1d");
        let parts = raw.cursor("s", 2).unwrap().unwrap();
        assert!(is_400(cursor_part::<String>(&parts[0]), "cursor"));
        assert!(is_400(
            cursor_part::<String>(&"x".repeat(MAX_CURSOR_TEXT + 1)),
            "cursor"
        ));
    }

    #[test]
    fn a_cursor_longer_than_any_list_makes_is_a_400() {
        let longest_skill_name = "\u{1}".repeat(200);
        let made = cursor_of(&[&longest_skill_name, &i64::MAX.to_string()]);
        assert!(made.len() <= MAX_CURSOR_LEN, "{}", made.len());
        assert!(query(&made).cursor("k", 2).is_ok());
        let long = cursor_of(&[&"x".repeat(MAX_CURSOR_LEN)]);
        assert!(is_400(query(&long).cursor("k", 1), "cursor"));
    }

    #[test]
    fn cursor_dates_and_ranks_outside_what_postgresql_takes_are_a_400() {
        for bad in ["-10000-01-01", "+262143-01-01", "0000-12-31", "2024-02-30"] {
            assert!(is_400(cursor_part::<NaiveDate>(bad), "cursor"), "{bad}");
        }
        assert!(cursor_part::<NaiveDate>("2024-02-29").is_ok());
        assert!(is_400(
            cursor_part::<DateTime<Utc>>("+100000-01-01T00:00:00Z"),
            "cursor"
        ));
        assert!(cursor_part::<DateTime<Utc>>("2024-01-01T00:00:00.000001Z").is_ok());
        for bad in ["NaN", "inf", "-inf", "-0.5", "1e39"] {
            assert!(is_400(cursor_part::<f32>(bad), "cursor"), "{bad}");
        }
        assert_eq!(cursor_part::<f32>("0.0607927").unwrap(), 0.0607927);
    }

    fn web(q: &str) -> String {
        WebSearch::parse(q).as_str().to_owned()
    }

    #[test]
    fn ordinary_searches_reach_postgresql_as_typed() {
        for q in [
            "kubernetes",
            "rust -java",
            "\"site reliability\" or devops",
            "c++ node.js state-of-the-art",
            "-\"project manager\" agile",
        ] {
            assert_eq!(web(q), q);
        }
    }

    #[test]
    fn a_run_of_dashes_becomes_at_most_one_negation() {
        assert_eq!(web(&"-".repeat(50)), "");
        assert_eq!(web(&format!("{}cat", "-".repeat(50))), "cat");
        assert_eq!(web(&format!("{}cat", "-".repeat(51))), "-cat");
        assert_eq!(web(&format!("{}cat", "- ".repeat(41))), "-cat");
        assert_eq!(web(&format!("{}cat", "-(".repeat(100))), "cat");
        assert_eq!(web("dog - - - \"a b\""), "dog -\"a b\"");
        assert_eq!(web("a----b"), "a----b", "dashes inside a word stay");
    }

    #[test]
    fn operators_and_unpaired_quotes_become_separators() {
        assert_eq!(web("a&b|c!(d)<e"), "a b c d e");
        assert_eq!(web("\"open phrase"), "open phrase");
        assert_eq!(web("\"x y\" \"z"), "\"x y\" z");
        assert_eq!(web("\"\" -\"  \" cat"), "cat");
    }

    /// The shape PostgreSQL's `websearch_to_tsquery` cannot choke on:
    /// space-separated tokens, each a word or a quoted phrase with at most
    /// one leading `-`, and no operator characters outside phrases.
    fn well_formed(out: &str) -> bool {
        let mut rest = out;
        while !rest.is_empty() {
            let token = rest.strip_prefix('-').unwrap_or(rest);
            let (ok, next) = if let Some(phrase) = token.strip_prefix('"') {
                match phrase.find('"') {
                    Some(end) => (end > 0, &phrase[end + 1..]),
                    None => (false, ""),
                }
            } else {
                let end = token.find(' ').unwrap_or(token.len());
                let word = &token[..end];
                let ok = !word.is_empty()
                    && !word.starts_with('-')
                    && !word.contains(|c: char| {
                        c == '"' || c.is_whitespace() || TSQUERY_OPERATORS.contains(&c)
                    });
                (ok, &token[end..])
            };
            if !ok {
                return false;
            }
            rest = match next.strip_prefix(' ') {
                Some(more) if !more.is_empty() => more,
                None if next.is_empty() => "",
                _ => return false,
            };
        }
        true
    }

    /// Text biased towards what the search syntax gives meaning to.
    fn search_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("-".to_string()),
            Just("\"".to_string()),
            Just(" ".to_string()),
            Just("or".to_string()),
            "[!&|()<>:*'\\\\]".prop_map(|s| s),
            any::<char>().prop_map(String::from),
            "[a-z]{1,6}".prop_map(|s| s),
        ];
        proptest::collection::vec(piece, 0..120).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn any_cursor_text_decodes_or_is_a_400(raw in any::<String>()) {
            let q = query(&raw);
            match q.cursor("s", 2) {
                Ok(_) => {}
                Err(e) => prop_assert!(is_400(Err::<(), _>(e), "cursor")),
            }
        }

        #[test]
        fn any_decoded_cursor_parts_parse_or_are_a_400(
            parts in proptest::collection::vec(any::<String>(), 0..4),
            kind in prop_oneof![Just("s".to_string()), any::<String>()],
        ) {
            let raw = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&(kind, &parts)).unwrap());
            if let Ok(Some(found)) = query(&raw).cursor("s", 2) {
                for part in &found {
                    for result in [
                        cursor_part::<i64>(part).map(drop),
                        cursor_part::<f32>(part).map(drop),
                        cursor_part::<String>(part).map(drop),
                        cursor_part::<NaiveDate>(part).map(drop),
                        cursor_part::<DateTime<Utc>>(part).map(drop),
                    ] {
                        prop_assert!(result.is_ok() || is_400(result, "cursor"));
                    }
                }
            }
        }

        #[test]
        fn any_q_is_well_formed_search_input_or_a_400(text in prop_oneof![any::<String>(), search_text()]) {
            let q = ListQuery { q: Some(text), ..ListQuery::default() };
            match q.web_search() {
                Ok(None) => {}
                Ok(Some(web)) => {
                    prop_assert!(well_formed(web.as_str()), "{:?}", web);
                    prop_assert_eq!(WebSearch::parse(web.as_str()), web.clone(), "parsing is idempotent");
                }
                Err(e) => prop_assert!(is_400(Err::<(), _>(e), "q")),
            }
        }
    }
}
