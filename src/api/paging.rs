//! What the tenant data routes share: list queries with cursor paging, the
//! page they return, field checks, and enums to and from their stored names.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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

    /// 1..=200, 50 when absent.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(invalid("limit", "must be between 1 and 200")),
        }
    }

    /// The decoded cursor: the sort key of the last item of the previous
    /// page, as `parts` strings, each parsed by the caller.
    pub fn cursor(&self, kind: &str, parts: usize) -> Result<Option<Vec<String>>, ApiError> {
        // An empty cursor is the first page (as when absent).
        let Some(raw) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let bad = || invalid("cursor", "is not a cursor this list returned");
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
        let (found, values): (String, Vec<String>) =
            serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if found != kind || values.len() != parts {
            return Err(bad());
        }
        Ok(Some(values))
    }
}

/// Parse one part of a cursor.
pub fn cursor_part<T: std::str::FromStr>(value: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| invalid("cursor", "is not a cursor this list returned"))
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
}
