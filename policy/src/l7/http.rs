//! HTTP rules: method, path and host regexes (full match) and header presence or exact value.
//!
//! Semantics as Cilium's: a regex must match the whole field (it is implicitly anchored at both
//! ends); `path` is matched against the request target *including* its query string; `host`
//! against the authority as the client sent it; fields of one rule are ANDed, rules are ORed.

use std::fmt;

use regex::{Regex, RegexBuilder};
use serde::{Serialize, Serializer};

/// A compiled, implicitly anchored regular expression, remembered with its source text.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

/// Compiled regexes may not grow beyond this (a bad pattern must not eat the proxy's memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    /// Compiles `source` so that it must match a whole field.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        let regex = RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    /// The pattern as written in the policy.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// A header requirement: presence, or an exact value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// Header name (matched case-insensitively).
    pub name: String,
    /// Exact value; `None` means the header only has to be present.
    pub value: Option<String>,
}

impl HeaderMatch {
    /// Parses Cilium's `headers` entry: `Name` (presence) or `Name: value` / `Name:value`.
    pub fn parse(text: &str) -> Result<HeaderMatch, String> {
        let text = text.trim();
        let (name, value) = match text.find([':', ' ']) {
            Some(i) => {
                let name = &text[..i];
                let rest = text[i..].trim_start_matches([':', ' ']).trim_start();
                (name, Some(rest.trim_end()))
            }
            None => (text, None),
        };
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!("invalid header name {name:?}"));
        }
        Ok(HeaderMatch {
            name: name.to_string(),
            value: value.map(str::to_string),
        })
    }
}

/// RFC 9110 token characters, the only ones a header name may hold.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One HTTP rule.
#[derive(Clone, Debug, Serialize)]
pub struct HttpRule {
    /// Index in the port's `rules.http` list.
    pub index: usize,
    /// Method regex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Pattern>,
    /// Path regex (against path and query).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<Pattern>,
    /// Host regex (against the authority).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Pattern>,
    /// Header requirements, all of which must hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// Access to a request's headers without copying them.
pub trait HeaderLookup {
    /// Calls `f` on each value of header `name` (case-insensitive) until it returns true; returns
    /// whether it did.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

fn any_value_of<K: AsRef<str>, V: AsRef<[u8]>>(
    headers: &[(K, V)],
    name: &str,
    f: &mut dyn FnMut(&[u8]) -> bool,
) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .any(|(_, v)| f(v.as_ref()))
}

impl<K: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for Vec<(K, V)> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        any_value_of(self, name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>, const N: usize> HeaderLookup for [(K, V); N] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        any_value_of(self, name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> HeaderLookup for &[(K, V)] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        any_value_of(self, name, f)
    }
}

/// The facts about one HTTP request that rules look at.
#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The request target: path and query.
    pub path: &'a str,
    /// The authority (`Host` header or `:authority`).
    pub host: &'a str,
    /// The headers.
    pub headers: &'a dyn HeaderLookup,
}

impl fmt::Debug for HttpRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (host {:?})", self.method, self.path, self.host)
    }
}

impl HttpRule {
    /// Whether the request satisfies every field of this rule.
    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        self.mismatch(req).is_none()
    }

    /// The first field that does not match, for explanations; `None` when the rule matches.
    pub fn mismatch(&self, req: &HttpRequest<'_>) -> Option<&'static str> {
        if let Some(m) = &self.method
            && !m.is_match(req.method)
        {
            return Some("method");
        }
        if let Some(p) = &self.path
            && !p.is_match(req.path)
        {
            return Some("path");
        }
        if let Some(h) = &self.host
            && !h.is_match(req.host)
        {
            return Some("host");
        }
        for h in &self.headers {
            let ok = match &h.value {
                None => req.headers.any_value(&h.name, &mut |_| true),
                Some(want) => req
                    .headers
                    .any_value(&h.name, &mut |v| v == want.as_bytes()),
            };
            if !ok {
                return Some("headers");
            }
        }
        None
    }
}

/// The index (in `rules`) of the first rule that allows the request, if any.
pub fn first_match(rules: &[HttpRule], req: &HttpRequest<'_>) -> Option<usize> {
    rules.iter().position(|r| r.matches(req))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        method: Option<&str>,
        path: Option<&str>,
        host: Option<&str>,
        headers: &[&str],
    ) -> HttpRule {
        HttpRule {
            index: 0,
            method: method.map(|m| Pattern::new(m).unwrap()),
            path: path.map(|p| Pattern::new(p).unwrap()),
            host: host.map(|h| Pattern::new(h).unwrap()),
            headers: headers
                .iter()
                .map(|h| HeaderMatch::parse(h).unwrap())
                .collect(),
        }
    }

    fn req<'a, const N: usize>(
        method: &'a str,
        path: &'a str,
        headers: &'a [(&'a str, &'a str); N],
    ) -> HttpRequest<'a> {
        HttpRequest {
            method,
            path,
            host: "deathstar.empire.svc",
            headers,
        }
    }

    #[test]
    fn regexes_are_full_matches() {
        let r = rule(Some("GET"), Some("/v1/.*"), None, &[]);
        assert!(r.matches(&req("GET", "/v1/foo", &[])));
        assert!(
            !r.matches(&req("GETX", "/v1/foo", &[])),
            "method is anchored"
        );
        assert!(
            !r.matches(&req("GET", "/x/v1/foo", &[])),
            "path is anchored at the start"
        );
        let r = rule(None, Some("/public"), None, &[]);
        assert!(
            !r.matches(&req("GET", "/public?x=1", &[])),
            "the query string is part of the path"
        );
        assert!(
            !r.matches(&req("GET", "/publicity", &[])),
            "the path is anchored at the end"
        );
        let r = rule(None, None, Some("deathstar\\..*"), &[]);
        assert!(r.matches(&req("GET", "/", &[])));
    }

    #[test]
    fn alternation_is_anchored_as_a_whole() {
        let r = rule(Some("GET|HEAD"), None, None, &[]);
        assert!(r.matches(&req("HEAD", "/", &[])));
        assert!(!r.matches(&req("GETS", "/", &[])));
    }

    #[test]
    fn headers_presence_and_exact_value() {
        let r = rule(None, None, None, &["X-Has", "X-Token: abc"]);
        assert!(r.matches(&req("GET", "/", &[("x-has", ""), ("X-TOKEN", "abc")])));
        assert!(!r.matches(&req("GET", "/", &[("x-has", ""), ("X-Token", "abcd")])));
        assert!(!r.matches(&req("GET", "/", &[("X-Token", "abc")])));
        assert_eq!(r.mismatch(&req("GET", "/", &[])), Some("headers"));
    }

    #[test]
    fn header_syntax() {
        assert_eq!(
            HeaderMatch::parse("X-Token:abc").unwrap(),
            HeaderMatch {
                name: "X-Token".into(),
                value: Some("abc".into())
            }
        );
        assert_eq!(
            HeaderMatch::parse("X-Token: a b").unwrap().value.as_deref(),
            Some("a b")
        );
        assert_eq!(HeaderMatch::parse("X-Token").unwrap().value, None);
        assert!(HeaderMatch::parse(": x").is_err());
        assert!(HeaderMatch::parse("Bad(Name): x").is_err());
    }

    #[test]
    fn empty_rule_allows_everything() {
        let r = rule(None, None, None, &[]);
        assert_eq!(
            first_match(std::slice::from_ref(&r), &req("DELETE", "/x", &[])),
            Some(0)
        );
    }
}
