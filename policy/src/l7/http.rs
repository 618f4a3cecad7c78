//! HTTP rules: method, path and host regexes (full match) and header presence or exact value.
//!
//! Semantics as Cilium's: a regex must match the whole field (it is implicitly anchored at both
//! ends); `path` is matched against the request target *including* its query string; `host`
//! against the authority as the client sent it; fields of one rule are ANDed, rules are ORed.

use std::fmt;
use std::panic::{RefUnwindSafe, UnwindSafe};

use regex::RegexBuilder;
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind, PatternSet, meta};
use serde::{Serialize, Serializer};

/// A validated regular expression from a policy, remembered as written. It is compiled, together
/// with the other patterns of the same field in the same port's rules, into an [`HttpRules`] set.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
}

/// Compiled regexes may not grow beyond this (a bad pattern must not eat the proxy's memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Pattern {
    /// Checks that `source` compiles (as a whole-field match) and keeps it.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        RegexBuilder::new(&anchored(source))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(Pattern {
            source: source.to_string(),
        })
    }

    /// The pattern as written in the policy.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Cilium's regexes must match the whole field: anchor them, keeping alternations inside.
fn anchored(source: &str) -> String {
    format!("^(?:{source})$")
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

/// A request without headers (what a header-less probe or a test judges).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn any_value(&self, _name: &str, _f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        false
    }
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

/// The HTTP rules of one `toPorts` item, compiled once per policy change: one regex set per field
/// (method, path, host), so judging a request scans each field once whatever the number of rules.
#[derive(Clone)]
pub struct HttpRules {
    rules: Vec<HttpRule>,
    method: FieldSet,
    path: FieldSet,
    host: FieldSet,
}

/// The patterns of one field across rules; `slot[i]` is rule i's pattern in `set`, if it has one.
/// Built as `regex::RegexSet` builds its sets (every pattern reported, anchored by `anchored`),
/// but matched into a `PatternSet` taken from a pool, so judging a request allocates nothing
/// (`RegexSet::matches` allocates one per call).
struct FieldSet {
    set: Option<meta::Regex>,
    slot: Vec<Option<usize>>,
    matches: PatternSets,
}

type NewPatternSet = Box<dyn Fn() -> PatternSet + Send + Sync + RefUnwindSafe + UnwindSafe>;
type PatternSets = Pool<PatternSet, NewPatternSet>;

fn pattern_sets(len: usize) -> PatternSets {
    Pool::new(Box::new(move || PatternSet::new(len)))
}

impl Clone for FieldSet {
    fn clone(&self) -> FieldSet {
        FieldSet {
            set: self.set.clone(),
            slot: self.slot.clone(),
            matches: pattern_sets(self.set.as_ref().map_or(0, meta::Regex::pattern_len)),
        }
    }
}

impl FieldSet {
    fn new(
        rules: &[HttpRule],
        field: impl Fn(&HttpRule) -> Option<&Pattern>,
    ) -> Result<FieldSet, regex::Error> {
        let mut patterns = Vec::new();
        let slot = rules
            .iter()
            .map(|r| {
                field(r).map(|p| {
                    patterns.push(anchored(p.as_str()));
                    patterns.len() - 1
                })
            })
            .collect();
        let set = if patterns.is_empty() {
            None
        } else {
            Some(
                meta::Builder::new()
                    .configure(
                        meta::Config::new()
                            .match_kind(MatchKind::All)
                            .utf8_empty(true)
                            .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
                            .nfa_size_limit(Some(REGEX_SIZE_LIMIT)),
                    )
                    .syntax(syntax::Config::new().utf8(true))
                    .build_many(&patterns)
                    .map_err(|e| match e.size_limit() {
                        Some(limit) => regex::Error::CompiledTooBig(limit),
                        None => regex::Error::Syntax(e.to_string()),
                    })?,
            )
        };
        Ok(FieldSet {
            matches: pattern_sets(patterns.len()),
            set,
            slot,
        })
    }

    /// The matches for `text`, computed only when some rule has a pattern for this field.
    fn matches(&self, text: &str) -> Option<PoolGuard<'_, PatternSet, NewPatternSet>> {
        let set = self.set.as_ref()?;
        let mut found = self.matches.get();
        found.clear();
        set.which_overlapping_matches(&Input::new(text), &mut found);
        Some(found)
    }

    fn ok(&self, matches: Option<&PatternSet>, rule: usize) -> bool {
        match (self.slot[rule], matches) {
            (None, _) => true,
            (Some(i), Some(m)) => m.contains(regex_automata::PatternID::new_unchecked(i)),
            (Some(_), None) => false,
        }
    }
}

impl HttpRules {
    /// Compiles the rules of one port. Each pattern has been validated on its own already; this
    /// fails only when the combined set exceeds the size limit.
    pub fn new(rules: Vec<HttpRule>) -> Result<HttpRules, regex::Error> {
        Ok(HttpRules {
            method: FieldSet::new(&rules, |r| r.method.as_ref())?,
            path: FieldSet::new(&rules, |r| r.path.as_ref())?,
            host: FieldSet::new(&rules, |r| r.host.as_ref())?,
            rules,
        })
    }

    /// The rules, in policy order.
    pub fn rules(&self) -> &[HttpRule] {
        &self.rules
    }

    /// Every rule the request satisfies (indexes into [`rules`](Self::rules)).
    pub fn matching(&self, req: &HttpRequest<'_>) -> Vec<usize> {
        self.verdicts(req)
            .filter_map(|(i, miss)| miss.is_none().then_some(i))
            .collect()
    }

    /// The first rule the request satisfies.
    pub fn first_match(&self, req: &HttpRequest<'_>) -> Option<usize> {
        self.verdicts(req)
            .find_map(|(i, miss)| miss.is_none().then_some(i))
    }

    /// For each rule, the first field the request fails (`None` when the rule matches).
    pub fn verdicts<'s>(
        &'s self,
        req: &HttpRequest<'s>,
    ) -> impl Iterator<Item = (usize, Option<&'static str>)> + 's {
        let method = self.method.matches(req.method);
        let path = self.path.matches(req.path);
        let host = self.host.matches(req.host);
        let headers = req.headers;
        self.rules.iter().enumerate().map(move |(i, rule)| {
            let miss = if !self.method.ok(method.as_deref(), i) {
                Some("method")
            } else if !self.path.ok(path.as_deref(), i) {
                Some("path")
            } else if !self.host.ok(host.as_deref(), i) {
                Some("host")
            } else if !rule.headers.iter().all(|h| h.is_satisfied(headers)) {
                Some("headers")
            } else {
                None
            };
            (i, miss)
        })
    }
}

impl fmt::Debug for HttpRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.rules).finish()
    }
}

impl Serialize for HttpRules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.rules.serialize(s)
    }
}

impl HeaderMatch {
    /// Whether the request's headers satisfy this requirement. A header sent more than once is
    /// judged by its values joined with `,`, in order, as Envoy's header matcher (and so Cilium,
    /// and Envoy's RBAC) judges it: `X: a` then `X: b` satisfy `X: a,b`, and neither `X: a` nor
    /// `X: b`, so a repeated security header never passes on one of its copies.
    pub fn is_satisfied(&self, headers: &dyn HeaderLookup) -> bool {
        let Some(want) = &self.value else {
            return headers.any_value(&self.name, &mut |_| true);
        };
        // Walks the joined value against `want` without building it.
        let want = want.as_bytes();
        let (mut at, mut seen, mut differs) = (0, false, false);
        headers.any_value(&self.name, &mut |v| {
            if seen {
                if want.get(at) != Some(&b',') {
                    differs = true;
                    return true;
                }
                at += 1;
            }
            seen = true;
            if !want[at..].starts_with(v) {
                differs = true;
                return true;
            }
            at += v.len();
            false
        });
        seen && !differs && at == want.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        method: Option<&str>,
        path: Option<&str>,
        host: Option<&str>,
        headers: &[&str],
    ) -> HttpRules {
        HttpRules::new(vec![HttpRule {
            index: 0,
            method: method.map(|m| Pattern::new(m).unwrap()),
            path: path.map(|p| Pattern::new(p).unwrap()),
            host: host.map(|h| Pattern::new(h).unwrap()),
            headers: headers
                .iter()
                .map(|h| HeaderMatch::parse(h).unwrap())
                .collect(),
        }])
        .unwrap()
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

    fn matches(r: &HttpRules, q: &HttpRequest<'_>) -> bool {
        r.first_match(q).is_some()
    }

    #[test]
    fn regexes_are_full_matches() {
        let r = rule(Some("GET"), Some("/v1/.*"), None, &[]);
        assert!(matches(&r, &req("GET", "/v1/foo", &[])));
        assert!(
            !matches(&r, &req("GETX", "/v1/foo", &[])),
            "method is anchored"
        );
        assert!(
            !matches(&r, &req("GET", "/x/v1/foo", &[])),
            "path is anchored at the start"
        );
        let r = rule(None, Some("/public"), None, &[]);
        assert!(
            !matches(&r, &req("GET", "/public?x=1", &[])),
            "the query string is part of the path"
        );
        assert!(
            !matches(&r, &req("GET", "/publicity", &[])),
            "the path is anchored at the end"
        );
        let r = rule(None, None, Some("deathstar\\..*"), &[]);
        assert!(matches(&r, &req("GET", "/", &[])));
    }

    #[test]
    fn alternation_is_anchored_as_a_whole() {
        let r = rule(Some("GET|HEAD"), None, None, &[]);
        assert!(matches(&r, &req("HEAD", "/", &[])));
        assert!(!matches(&r, &req("GETS", "/", &[])));
    }

    #[test]
    fn headers_presence_and_exact_value() {
        let r = rule(None, None, None, &["X-Has", "X-Token: abc"]);
        assert!(matches(
            &r,
            &req("GET", "/", &[("x-has", ""), ("X-TOKEN", "abc")])
        ));
        assert!(!matches(
            &r,
            &req("GET", "/", &[("x-has", ""), ("X-Token", "abcd")])
        ));
        assert!(!matches(&r, &req("GET", "/", &[("X-Token", "abc")])));
        assert_eq!(
            r.verdicts(&req("GET", "/", &[])).next(),
            Some((0, Some("headers")))
        );
    }

    #[test]
    fn a_repeated_header_is_judged_by_its_joined_values() {
        let r = rule(None, None, None, &["X-Token: abc"]);
        let with = |values: &[&str]| {
            let headers: Vec<(&str, &str)> = values.iter().map(|v| ("x-token", *v)).collect();
            let request = HttpRequest {
                method: "GET",
                path: "/",
                host: "",
                headers: &headers,
            };
            matches(&r, &request)
        };
        assert!(with(&["abc"]));
        assert!(!with(&["abc", "abc"]));
        assert!(!with(&["nope", "abc"]));
        assert!(!with(&["abc", "nope"]));
        assert!(!with(&["ab", "c"]), "joined with a comma: ab,c");
        assert!(!with(&["", "abc"]));
        assert!(!with(&[]));
        let joined = rule(None, None, None, &["X-Token: a,b"]);
        let headers = [("X-Token", "a"), ("x-other", "z"), ("x-token", "b")];
        assert!(matches(&joined, &req("GET", "/", &headers)));
        assert!(matches(&joined, &req("GET", "/", &[("X-Token", "a,b")])));
        assert!(!matches(&joined, &req("GET", "/", &[("X-Token", "a")])));
        // Presence: any copy will do.
        let present = rule(None, None, None, &["X-Has"]);
        assert!(matches(
            &present,
            &req("GET", "/", &[("x-has", ""), ("x-has", "1")])
        ));
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
        assert_eq!(r.first_match(&req("DELETE", "/x", &[])), Some(0));
    }

    #[test]
    fn several_rules_share_one_set_per_field() {
        let rules: Vec<HttpRule> = [("GET", "/a"), ("POST", "/b.*"), ("GET|POST", "/c")]
            .iter()
            .enumerate()
            .map(|(i, (m, p))| HttpRule {
                index: i,
                method: Some(Pattern::new(m).unwrap()),
                path: Some(Pattern::new(p).unwrap()),
                host: None,
                headers: vec![],
            })
            .collect();
        let set = HttpRules::new(rules).unwrap();
        assert_eq!(set.matching(&req("POST", "/c", &[])), vec![2]);
        assert_eq!(set.matching(&req("POST", "/bx", &[])), vec![1]);
        assert_eq!(set.first_match(&req("GET", "/b", &[])), None);
        let misses: Vec<_> = set.verdicts(&req("GET", "/b", &[])).collect();
        assert_eq!(
            misses,
            vec![(0, Some("path")), (1, Some("method")), (2, Some("path"))]
        );
    }
}
