//! Request-path normalization, applied before both matching and forwarding so that the bytes a
//! rule saw are the bytes the upstream gets, and `/public/../private` cannot pass a rule written
//! for `/public.*`.
//!
//! In order: percent-encoded unreserved characters are decoded (`%41` -> `A`, `%2e` -> `.`),
//! other percent-encodings get upper-case hex (`%2f` -> `%2F`, which stays encoded: decoding a
//! slash would change which resource is named), runs of `/` become one, and RFC 3986 §5.2.4
//! removes `.` and `..` segments (`..` never climbs above the root). The query is left alone.
//! Malformed percent-encoding (`%zz`, a trailing `%4`) is refused rather than guessed at.

use std::borrow::Cow;
use std::fmt;

/// Why a path cannot be normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// Not an origin-form path (`/...`) nor `*`.
    NotOriginForm,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::BadPercentEncoding => "malformed percent-encoding in the request path",
            PathError::NotOriginForm => "the request path does not start with '/'",
        })
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether a path is already in normal form (the common case: no allocation then).
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut prev_slash = false;
    let mut seg_start = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => return false,
            b'/' => {
                if prev_slash {
                    return false;
                }
                let seg = &b[seg_start..i];
                if seg == b"." || seg == b".." {
                    return false;
                }
                prev_slash = true;
                seg_start = i + 1;
            }
            _ => prev_slash = false,
        }
    }
    let last = &b[seg_start..];
    last != b"." && last != b".."
}

/// Normalizes a request target (path and optional query). `*` is returned as is.
pub fn normalize_target(target: &str) -> Result<Cow<'_, str>, PathError> {
    if target == "*" {
        return Ok(Cow::Borrowed(target));
    }
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], &target[q..]),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(target));
    }
    let decoded = decode_unreserved(path)?;
    let mut out = remove_dot_segments(&merge_slashes(&decoded));
    out.push_str(query);
    Ok(Cow::Owned(out))
}

/// The target as a more lenient server reads it, when that differs from `target` (a normalized
/// target): `%2F`, `%5C` and `\` taken for separators (nginx decodes `%2F` before it resolves dot
/// segments; Windows servers and Envoy's path normalization take a backslash for a slash), and
/// `;parameters` cut from each segment (Tomcat reads `..;x` as `..`); then slashes merged and
/// dot segments removed. The query is left alone. A request must be allowed under this reading
/// too, so that `/public/..%2Fprivate` cannot reach an nginx upstream's `/private` through a rule
/// for `/public.*`, while `/public/a%2Fb` still passes that rule.
pub fn lenient_reading(target: &str) -> Option<String> {
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], &target[q..]),
        None => (target, ""),
    };
    if !path.starts_with('/') || !path.bytes().any(|b| matches!(b, b'%' | b'\\' | b';')) {
        return None;
    }
    let b = path.as_bytes();
    let mut read = Vec::with_capacity(b.len());
    let mut in_parameters = false;
    let mut i = 0;
    while i < b.len() {
        let escaped_separator = b[i] == b'%'
            && b.get(i + 1..i + 3)
                .is_some_and(|h| h.eq_ignore_ascii_case(b"2f") || h.eq_ignore_ascii_case(b"5c"));
        if escaped_separator || matches!(b[i], b'/' | b'\\') {
            read.push(b'/');
            in_parameters = false;
            i += if escaped_separator { 3 } else { 1 };
            continue;
        }
        in_parameters |= b[i] == b';';
        if !in_parameters {
            read.push(b[i]);
        }
        i += 1;
    }
    // Only whole runs of ASCII were cut or replaced, so this is still UTF-8.
    let read = String::from_utf8(read)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let mut read = remove_dot_segments(&merge_slashes(&read));
    read.push_str(query);
    (read != target).then_some(read)
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadPercentEncoding);
            };
            let v = h << 4 | l;
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push(b[i + 1].to_ascii_uppercase() as char);
                out.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
        } else {
            // Copy the run up to the next '%' in one go (keeps multi-byte UTF-8 intact).
            let next = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
        }
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut prev_slash = false;
    for c in path.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path without empty segments (slashes already merged).
fn remove_dot_segments(path: &str) -> String {
    let parts: Vec<&str> = path[1..].split('/').collect();
    let mut segments: Vec<&str> = Vec::with_capacity(parts.len());
    for seg in &parts {
        match *seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // A dot segment in the last position names a directory: the result keeps its slash.
    if matches!(parts.last(), Some(&("." | ".."))) {
        segments.push("");
    }
    let mut out = String::with_capacity(path.len());
    out.push('/');
    out.push_str(&segments.join("/"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> String {
        normalize_target(s).unwrap().into_owned()
    }

    #[test]
    fn rfc3986_examples_and_bypass_attempts() {
        assert_eq!(n("/public/../private"), "/private");
        assert_eq!(n("/public/%2e%2e/private"), "/private");
        assert_eq!(n("/public/%2E%2E/private"), "/private");
        assert_eq!(n("/a/b/c/./../../g"), "/a/g");
        assert_eq!(n("/mid/content=5/../6"), "/mid/6");
        assert_eq!(n("//private"), "/private");
        assert_eq!(n("/public//..//private"), "/private");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/a/."), "/a/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/."), "/");
        assert_eq!(n("/%7euser/%41"), "/~user/A");
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a/b?x=/../y"), "/a/b?x=/../y");
        assert_eq!(n("/a/./b?q"), "/a/b?q");
        assert_eq!(n("/"), "/");
        assert_eq!(n("*"), "*");
        assert_eq!(n("/a..b/.c/"), "/a..b/.c/");
    }

    #[test]
    fn lenient_readings_of_escaped_separators_and_segment_parameters() {
        let r = |s: &str| lenient_reading(&n(s));
        assert_eq!(r("/public/..%2Fprivate").as_deref(), Some("/private"));
        assert_eq!(r("/public/..%2fprivate").as_deref(), Some("/private"));
        assert_eq!(r("/public/%2e%2e%2Fprivate").as_deref(), Some("/private"));
        assert_eq!(r("/public/..%5Cprivate").as_deref(), Some("/private"));
        assert_eq!(r("/public\\..\\private").as_deref(), Some("/private"));
        assert_eq!(r("/public/..;/private").as_deref(), Some("/private"));
        assert_eq!(
            r("/public/..;x=1/private?a=..%2F").as_deref(),
            Some("/private?a=..%2F")
        );
        assert_eq!(r("/public/a%2Fb").as_deref(), Some("/public/a/b"));
        assert_eq!(r("/app/page;jsessionid=1").as_deref(), Some("/app/page"));
        assert_eq!(r("/caf\u{e9};x/..%2F\u{e9}").as_deref(), Some("/\u{e9}"));
        // Nothing a lenient server reads differently: no second reading.
        for p in [
            "/public/a",
            "/a%20b",
            "/a/b?x=%2F;..\\",
            "*",
            "/a%252F..%252Fb",
        ] {
            assert_eq!(r(p), None, "{p}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/public/index.html", "/a/b/?q=%zz", "/a..b"] {
            assert!(matches!(normalize_target(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn malformed_input_is_refused() {
        assert_eq!(
            normalize_target("/a%zz"),
            Err(PathError::BadPercentEncoding)
        );
        assert_eq!(normalize_target("/a%4"), Err(PathError::BadPercentEncoding));
        assert_eq!(normalize_target("a/b"), Err(PathError::NotOriginForm));
        assert_eq!(normalize_target(""), Err(PathError::NotOriginForm));
    }

    proptest! {
        #[test]
        fn normal_form_is_stable_and_dot_free(raw in "(/(\\.|\\.\\.|%2[eE]|[a-c]{1,3}|%41|%2f|))*(\\?[a-z./]*)?") {
            let target = if raw.starts_with('/') { raw.clone() } else { format!("/{raw}") };
            let once = n(&target);
            // Idempotent: what the upstream gets would normalize to itself.
            prop_assert_eq!(n(&once), once.clone());
            let path = once.split('?').next().unwrap();
            prop_assert!(path.starts_with('/'));
            prop_assert!(!path.contains("//"), "{}", path);
            for seg in path.split('/') {
                prop_assert!(seg != "." && seg != "..", "{}", path);
            }
            prop_assert!(!path.to_ascii_lowercase().contains("%2e"), "{}", path);
        }

        #[test]
        fn lenient_reading_is_final_and_dot_free(raw in "(/(\\.|\\.\\.|%2[fF]|%5[cC]|\\\\|;[a-c=]*|[a-c]{1,3}|))*(\\?[a-z./%;]*)?") {
            let target = if raw.starts_with('/') { raw.clone() } else { format!("/{raw}") };
            let once = n(&target);
            if let Some(read) = lenient_reading(&once) {
                let path = read.split('?').next().unwrap();
                prop_assert!(path.starts_with('/') && !path.contains("//"), "{}", path);
                prop_assert!(!path.contains(['\\', ';']), "{}", path);
                prop_assert!(!path.to_ascii_lowercase().contains("%2f"), "{}", path);
                prop_assert!(!path.to_ascii_lowercase().contains("%5c"), "{}", path);
                for seg in path.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{}", path);
                }
                prop_assert_eq!(lenient_reading(&read), None);
                prop_assert_eq!(read.split_once('?').map(|q| q.1), once.split_once('?').map(|q| q.1));
            }
        }
    }
}
